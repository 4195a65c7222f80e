"""Shared helpers for the bypass tests: an index over a model's Linear/Conv1D weights, relative error."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from neuroada_tools.index.criteria import select
from neuroada_tools.io.sidecar import IndexSidecar, TensorEntry

_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def make_index(model: nn.Module, k: int, want=lambda name, module: True, strip: str = "") -> IndexSidecar:
    """Index every Linear/Conv1D weight accepted by ``want``; names lose the ``strip`` prefix."""
    indices, entries = {}, {}
    for mname, m in model.named_modules():
        if not isinstance(m, (nn.Linear, Conv1D)) or not want(mname, m):
            continue
        w = m.weight.detach()
        layout = "out_in" if isinstance(m, nn.Linear) else "in_out"
        logical = w if layout == "out_in" else w.t()
        name = f"{mname}.weight".removeprefix(strip)
        indices[name] = select(logical, min(k, logical.shape[1]))
        entries[name] = TensorEntry(tuple(logical.shape), layout, _DTYPE_NAMES[w.dtype], "0" * 64)
    return IndexSidecar(k=k, criterion="magnitude", indices=indices, entries=entries)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
