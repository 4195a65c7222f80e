"""Shared helpers for the adapter API tests: sidecar files for a fixture model, model loading, snapshots."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from neuroada_tools.index.build import run_index
from neuroada_tools.io.sidecar import DeltaSidecar, IndexSidecar, read_index, write_delta

IDS = torch.tensor([[3, 17, 9, 41, 5, 22, 8], [11, 4, 30, 2, 19, 7, 13]])


def index_file(model_dir: Path, out: Path, k: int, **kw) -> IndexSidecar:
    if not out.exists():
        run_index(model_dir, k, out, **kw)
    return read_index(out)


def random_delta(index: IndexSidecar, path: Path | None, seed: int, scale: float = 0.05,
                 dense: dict[str, torch.Tensor] | None = None) -> DeltaSidecar:
    """A delta of ``index`` with seeded normal values (written to ``path`` when given)."""
    g = torch.Generator().manual_seed(seed)
    deltas = {n: scale * torch.randn(t.shape, generator=g) for n, t in sorted(index.indices.items())}
    delta = DeltaSidecar(index.digest, deltas, dense=dict(dense or {}))
    if path is not None:
        write_delta(path, delta)
    return delta


def load(model_dir: Path, task: str = "causal-lm", dtype=None) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    kw = {"dtype": dtype} if dtype is not None else {}
    return cls.from_pretrained(str(model_dir), **kw).eval()


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` (so ``-0.0`` differs from ``0.0`` and a NaN equals itself)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_same(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Every state-dict tensor bit for bit as in ``before`` (the same names, no extra ones)."""
    now = model.state_dict()
    assert list(now) == list(before)
    for n, t in now.items():
        assert t.dtype == before[n].dtype and torch.equal(bits(t), bits(before[n])), n
