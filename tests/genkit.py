"""Shared by the generation tests: the three forms of a tuned tiny decoder, built once per session.

``decoder_forms(name)`` (the ``decoder_forms`` fixture of ``conftest.py``) indexes a fixture model
(k=3), draws a random delta (0.05 x N(0, 1): small, yet it changes the greedy tokens of the fixtures),
merges it to safetensors and exports the merged folder to ONNX with ``model_with_past.onnx``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from neuroada_tools.export.merge import merge_to_folder
from neuroada_tools.export.onnx_export import export_onnx
from neuroada_tools.index.build import run_index
from neuroada_tools.io.sidecar import DeltaSidecar, read_index, write_delta


@dataclass(frozen=True)
class Forms:
    base: Path
    index: Path
    delta: Path
    merged: Path
    onnx: Path

    def unmerged_args(self) -> list:
        return ["--model", self.base, "--index", self.index, "--delta", self.delta]


def random_delta(base: Path, tmp: Path, *, k: int = 3, scale: float = 0.05, seed: int = 0) -> tuple[Path, Path]:
    """An index of ``base`` and a random causal-LM delta for it."""
    ip, dp = tmp / "m.index.safetensors", tmp / "m.delta.safetensors"
    run_index(base, k, ip, force=True)
    index = read_index(ip)
    g = torch.Generator().manual_seed(seed)
    deltas = {n: torch.randn(t.shape, generator=g) * scale for n, t in index.indices.items()}
    write_delta(dp, DeltaSidecar(index.digest, deltas, {}, "causal-lm", {}))
    return ip, dp


def forms_getter(fixture_models: dict[str, Path], root: Path):
    done: dict[str, Forms] = {}

    def get(name: str) -> Forms:
        if name not in done:
            tmp = root / name
            tmp.mkdir()
            ip, dp = random_delta(fixture_models[name], tmp)
            merge_to_folder(fixture_models[name], ip, dp, tmp / "merged")
            export_onnx(tmp / "merged", tmp / "onnx", with_past=True)
            done[name] = Forms(fixture_models[name], ip, dp, tmp / "merged", tmp / "onnx")
        return done[name]

    return get
