"""The resume state of ``train-sparse`` (formats/state-v1.md): a safetensors file, no pickle.

The resume state (safetensors, no pickle):

- ``param.<name>``: every trainable parameter (fp32), ``<name>`` as in ``model.named_parameters()``
  (``model.layers.0.self_attn.q_proj.neuroada_delta``, ``classifier.weight``);
- ``adam.exp_avg.<name>``, ``adam.exp_avg_sq.<name>``, ``adam.step.<name>`` (0-d fp32): AdamW's
  state for that parameter;
- ``rng.cpu`` (uint8): ``torch.get_rng_state()`` (dropout); ``rng.cuda`` on CUDA;
- ``__metadata__``: ``neuroada.magic = "neuroada-train-state"``, ``neuroada.version = "1"``, and
  ``neuroada.state``: JSON with ``step``, ``epoch``, ``batch`` (the next micro-batch of that
  epoch), ``total_steps``, the counters (``tokens``, ``target_tokens``, ``first_loss``,
  ``last_loss``), ``index_sha256``, ``data_sha256``, ``delta_sha256`` (the delta sidecar written
  with it) and ``settings`` (everything that shapes the trajectory: seed, lr, batch size, ...).

The reader validates every field a resume relies on and raises ``TrainingError`` naming the file
and the field; the tensors of the parameters are checked against the model when they are
restored (``train/resume.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from neuroada_tools import __version__
from neuroada_tools.errors import TrainingError
from neuroada_tools.io.jsontext import parse_json
from neuroada_tools.io.outputs import atomic_file
from neuroada_tools.io.safetensors_file import read_all, read_header, write_file

STATE_MAGIC = "neuroada-train-state"
STATE_VERSION = 1


@dataclass
class TrainState:
    """A resume state as read: its tensors by name and its ``neuroada.state`` JSON."""

    tensors: dict[str, torch.Tensor]
    meta: dict


def state_path(output: Path | str) -> Path:
    """Where the resume state of the delta sidecar ``output`` lives.

    ``boolq.delta.safetensors`` -> ``boolq.state.safetensors``; ``out.safetensors`` ->
    ``out.state.safetensors``; any other name gets ``.state.safetensors`` appended.
    """
    output = Path(output)
    name = output.name
    for suffix in (".delta.safetensors", ".safetensors"):
        if name.endswith(suffix) and len(name) > len(suffix):
            stem = name[: -len(suffix)]
            if not stem.endswith(".state"):
                return output.with_name(stem + ".state.safetensors")
    return output.with_name(name + ".state.safetensors")


def write_state(
    path: Path, named: list[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer | None, meta: dict,
    *, adam: dict[str, dict[str, torch.Tensor]] | None = None,
) -> None:
    """Write the resume state of the trainable parameters ``named`` and their AdamW state, atomically.

    The AdamW state comes from ``optimizer``, or from ``adam`` (parameter name -> its state, e.g.
    whole tensors gathered from FSDP2 shards) when given."""
    tensors: dict[str, torch.Tensor] = {}
    for n, p in named:
        tensors[f"param.{n}"] = p.detach().float().cpu()
        st = adam[n] if adam is not None else optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in st:
                tensors[f"adam.{key}.{n}"] = torch.as_tensor(st[key], dtype=torch.float32).detach().cpu()
    tensors["rng.cpu"] = torch.get_rng_state()
    if any(p.is_cuda for _, p in named):
        tensors["rng.cuda"] = torch.cuda.get_rng_state(named[0][1].device)
    metadata = {
        "neuroada.magic": STATE_MAGIC,
        "neuroada.version": str(STATE_VERSION),
        "neuroada.state": json.dumps(meta, sort_keys=True, separators=(",", ":")),
        "neuroada.writer": f"neuroada-tools {__version__}",
    }
    with atomic_file(path) as tmp:
        write_file(tmp, tensors, metadata)


def read_state(path: Path) -> TrainState:
    """Read and validate a resume state (``TrainingError`` naming the file and field)."""
    header = read_header(path, TrainingError)
    label = path.name
    meta_raw = header.metadata
    if meta_raw.get("neuroada.magic") != STATE_MAGIC:
        raise TrainingError(f"{label}: not a train-sparse resume state (magic {meta_raw.get('neuroada.magic')!r})")
    if meta_raw.get("neuroada.version") != str(STATE_VERSION):
        raise TrainingError(f"{label}: unsupported resume state version {meta_raw.get('neuroada.version')!r}")
    meta = parse_json(
        meta_raw.get("neuroada.state", ""),
        TrainingError,
        f"{label}: neuroada.state is not valid JSON ({{why}})",
        f"{label}: neuroada.state is nested too deeply",
    )
    need = {
        "step": int,
        "epoch": int,
        "batch": int,
        "total_steps": int,
        "tokens": int,
        "target_tokens": int,
        "settings": dict,
        "index_sha256": str,
        "data_sha256": str,
    }
    for key, typ in need.items():
        if not isinstance(meta, dict) or not isinstance(meta.get(key), typ) or isinstance(meta.get(key), bool):
            raise TrainingError(f"{label}: neuroada.state field {key!r} missing or not {typ.__name__}")
    for key in ("step", "epoch", "batch", "tokens", "target_tokens"):
        if meta[key] < 0:
            raise TrainingError(f"{label}: neuroada.state field {key!r} is negative")
    tensors = read_all(path, header, TrainingError)
    rng = tensors.get("rng.cpu")
    if rng is None or rng.dtype != torch.uint8 or rng.dim() != 1:
        raise TrainingError(f"{label}: missing or malformed rng.cpu")
    return TrainState(tensors, meta)
