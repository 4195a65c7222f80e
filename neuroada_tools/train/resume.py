"""Continue a run from its resume state: refuse one made with other settings, restore the rest.

``resume`` restores the parameters, AdamW's state, the RNG and the data position, and continues:
``N`` steps, interrupted, then resumed to ``N + M`` gives the tensors of ``N + M`` steps straight.
Under torchrun the world size may change between the two, as long as the global batch
(``batch_size x grad_accum x world``) stays: the position is counted in examples.
A resume with other settings (``TRAJECTORY``) is refused, except a changed ``max_steps`` /
``epochs`` (the schedule is then recomputed for the new total).
"""

from __future__ import annotations

from pathlib import Path

import torch

from neuroada_tools.errors import TrainingError
from neuroada_tools.io.state import TrainState
from neuroada_tools.train.config import TRAJECTORY, TrainConfig
from neuroada_tools.train.distributed import like


def check_resume(meta: dict, settings: dict, index_digest: str, data_sha: str, total_steps: int,
                  state_file: Path, cfg: TrainConfig) -> None:
    label = state_file.name
    if meta["index_sha256"] != index_digest:
        raise TrainingError(
            f"{label}: trained with another index (sha256 {meta['index_sha256'][:12]}...), not {cfg.index}"
        )
    if meta["data_sha256"] != data_sha:
        raise TrainingError(f"{label}: trained on other data (sha256 {meta['data_sha256'][:12]}...), not {cfg.data}")
    saved = dict(meta["settings"])
    if "global_batch" not in saved and "batch_size" in saved:  # written before torchrun support: 1 process
        saved["global_batch"] = saved["batch_size"] * saved.get("grad_accum", 1)
    saved.setdefault("template", "alpaca")  # written before --template: the Alpaca template
    for key in TRAJECTORY:
        if saved.get(key) != settings.get(key):
            raise TrainingError(
                f"{label}: cannot resume with {key} = {settings.get(key)!r}; the state was trained with "
                    f"{saved.get(key)!r}"
            )
    if meta["step"] >= total_steps:
        raise TrainingError(
            f"{label}: already at step {meta['step']} of {total_steps}; nothing left to train "
            "(raise --max-steps or --epochs to train further)"
        )


def restore_state(state: TrainState, named, optimizer, device, state_file: Path) -> None:
    label = state_file.name
    t = state.tensors
    names = {n for n, _ in named}
    saved = {k[len("param.") :] for k in t if k.startswith("param.")}
    if saved != names:
        extra = sorted(saved ^ names)[0]
        raise TrainingError(f"{label}: trainable parameter {extra!r} is in only one of the state and the model")
    with torch.no_grad():
        for n, p in named:
            value = t[f"param.{n}"]
            if tuple(value.shape) != tuple(p.shape) or value.dtype != torch.float32:
                raise TrainingError(
                    f"{label}: param.{n} has shape {list(value.shape)} {value.dtype}, expected {list(p.shape)} fp32"
                )
            if not bool(torch.isfinite(value).all()):
                raise TrainingError(f"{label}: param.{n} is not finite")
            p.copy_(like(p, value.to(p.dtype)))
            st = {}
            for key in ("exp_avg", "exp_avg_sq"):
                v = t.get(f"adam.{key}.{n}")
                if v is None or tuple(v.shape) != tuple(p.shape):
                    raise TrainingError(f"{label}: adam.{key}.{n} missing or of the wrong shape")
                st[key] = like(p, v.to(device=p.device, dtype=p.dtype).clone())
            s = t.get(f"adam.step.{n}")
            if s is None or s.dim() != 0:
                raise TrainingError(f"{label}: adam.step.{n} missing or not a scalar")
            st["step"] = s.clone()
            optimizer.state[p] = st
    torch.set_rng_state(t["rng.cpu"].clone())
    if "rng.cuda" in t and device.type == "cuda":
        torch.cuda.set_rng_state(t["rng.cuda"].clone(), device)
