"""Load the forms of a tuned model as torch or ONNX Runtime objects: the base alone, the base with
its sidecars attached (unmerged), a merged folder, an ONNX folder.

``load_unmerged`` is what training produced, before any merge: the base loaded with transformers
for the delta's task (its dense head and label names too), with the index and delta attached on the
unfused reference path ``x W^T + x S^T`` (``mode="reference"``). ``load_complete`` loads a merged (or
any complete) folder and refuses one that lacks weights its class needs. ``Form`` wraps any of them,
or an ONNX folder's ``model.onnx``, behind one ``logits(inputs)`` call for scorers that need the
logits of whole sequences (``evaluate``); decoding sessions are ``generate``'s business.

Worked example (the tiny fixtures of the tests): ``open_form(merged=Path("merged"))`` gives
``Form(kind="merged", task="causal-lm", ...)``; ``form.logits({"input_ids": ids, "attention_mask": m})``
returns fp32 ``[batch, sequence, vocab]`` on the CPU, the same as
``open_form(onnx=Path("onnx")).logits(...)`` up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from neuroada_tools.errors import ModelError
from neuroada_tools.forms.onnx_runtime import ort_run, ort_session
from neuroada_tools.hf import detect_task, load_complete, load_model, task_config
from neuroada_tools.hf.signature import forward_params
from neuroada_tools.io.sidecar import DeltaSidecar, read_delta, read_index
from neuroada_tools.train import bypass

ONNX_MODEL_FILE = "model.onnx"


def load_unmerged_with_delta(model_dir: Path, index_path: Path, delta_path: Path, *, mode: str = "reference",
                             trust_remote_code: bool = False) -> tuple[nn.Module, str, DeltaSidecar]:
    """``(model, task, delta)``: the base with the sidecars attached, in eval mode (module docstring)."""
    index = read_index(index_path)
    delta = read_delta(delta_path, index)
    task = delta.task or "causal-lm"
    labels = delta.info.get("label_names") or None
    cfg = task_config(model_dir, task, num_labels=delta.info.get("num_labels"), label_names=labels,
                      trust_remote_code=trust_remote_code)
    model = load_model(model_dir, task, config=cfg, trust_remote_code=trust_remote_code)
    bypass.attach(model, index, delta, mode=mode)
    model.eval()
    return model, task, delta


def load_unmerged(model_dir: Path, index_path: Path, delta_path: Path, *, mode: str = "reference",
                  trust_remote_code: bool = False) -> tuple[nn.Module, str]:
    """``(model, task)``: the base model with the sidecars attached (what training produced)."""
    model, task, _ = load_unmerged_with_delta(model_dir, index_path, delta_path, mode=mode,
                                              trust_remote_code=trust_remote_code)
    return model, task


@dataclass
class Form:
    """One form of a model, ready for whole-sequence forwards. ``kind``: base, unmerged, merged, onnx.

    ``folder`` holds config.json and the tokenizer; ``model`` is the torch module (None for ONNX),
    ``session`` the ONNX Runtime session of ``model.onnx`` (None for torch)."""

    kind: str
    folder: Path
    task: str
    config: object
    detail: str
    model: nn.Module | None = None
    session: object = None
    where: str = ""
    inputs: list[str] = field(default_factory=list)

    @property
    def label_names(self) -> list[str]:
        """Classification: the label names in id order (``config.id2label``)."""
        id2label = getattr(self.config, "id2label", None) or {}
        return [str(id2label[i]) for i in sorted(id2label)]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device if self.model is not None else torch.device("cpu")

    def logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """fp32 logits on the CPU of a batch (no cache): ``[B, T, V]`` for a causal LM, ``[B, C]`` for a
        classifier. Inputs the form does not take are dropped."""
        feed = {k: v for k, v in inputs.items() if k in self.inputs}
        if self.model is not None:
            device = self.device
            feed = {k: v.to(device) for k, v in feed.items()}
            if "use_cache" in forward_params(self.model):
                feed["use_cache"] = False
            with torch.no_grad():
                return self.model(**feed).logits.detach().float().cpu()
        out = ort_run(self.session, feed, self.where)
        if "logits" not in out:
            raise ModelError(f"{self.where}: the graph has no output 'logits' (outputs: {sorted(out)})")
        return out["logits"].float()

    def describe(self) -> dict:
        return {"kind": self.kind, "folder": str(self.folder), "task": self.task, "detail": self.detail}


def _torch_form(kind: str, folder: Path, model: nn.Module, task: str, device: str | None) -> Form:
    if device is not None:
        try:
            model.to(device)
        except (RuntimeError, AssertionError, ValueError) as e:  # torch: no such device / not compiled
            raise ModelError(f"device {device!r}: cannot move the model there ({str(e).splitlines()[0]})") from None
    model.eval()
    params = forward_params(model)
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in params]
    return Form(kind, folder, task, model.config, f"{type(model).__name__} (torch)", model=model, inputs=names)


def open_form(*, model: Path | None = None, index: Path | None = None, delta: Path | None = None,
              merged: Path | None = None, onnx: Path | None = None, device: str | None = None,
              provider: str = "cpu") -> Form:
    """Open exactly one form: ``model`` alone (the base, zero-shot), ``model`` + ``index`` + ``delta``
    (unmerged), ``merged`` (a merged folder) or ``onnx`` (an ONNX folder's ``model.onnx``)."""
    if sum([model is not None, merged is not None, onnx is not None]) != 1 or (index is None) != (delta is None) \
            or (index is not None and model is None):
        raise ModelError("give one model: a base folder (with an index and a delta: base + bypass), "
                         "a merged folder, or an ONNX folder")
    if model is not None and index is not None:
        net, task = load_unmerged(Path(model), Path(index), Path(delta))
        return _torch_form("unmerged", Path(model), net, task, device)
    if model is not None or merged is not None:
        folder = Path(model if model is not None else merged)
        net, task = load_complete(folder)
        return _torch_form("base" if model is not None else "merged", folder, net, task, device)
    folder = Path(onnx)
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder}: not a model folder (no config.json)")
    path = folder / ONNX_MODEL_FILE
    if not path.is_file():
        raise ModelError(f"{folder}: no {ONNX_MODEL_FILE} (export with: merge --to onnx)")
    config = task_config(folder, "causal-lm")
    session = ort_session(path, provider)
    names = [i.name for i in session.get_inputs()]
    return Form("onnx", folder, detect_task(config), config, f"{ONNX_MODEL_FILE} (ONNX Runtime, {provider})",
                session=session, where=str(path), inputs=names)
