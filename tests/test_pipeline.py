"""export/pipeline.py: merge, then export to ONNX, staged beside the output and swapped in at the end."""

from __future__ import annotations

import os

import pytest
import torch

from neuroada_tools.errors import ModelError, OutputError
from neuroada_tools.export import onnx_export, pipeline
from neuroada_tools.index.build import run_index
from neuroada_tools.io.sidecar import DeltaSidecar, read_index, write_delta


@pytest.fixture(scope="module")
def sidecars(fixture_models, tmp_path_factory):
    """An index of the GPT-2 fixture and a delta with small non-zero values."""
    d = tmp_path_factory.mktemp("pipeline")
    ip, dp = d / "g.index.safetensors", d / "g.delta.safetensors"
    run_index(fixture_models["gpt2"], 2, ip)
    index = read_index(ip)
    gen = torch.Generator().manual_seed(0)
    deltas = {n: 0.01 * torch.randn(idx.shape, generator=gen) for n, idx in index.indices.items()}
    write_delta(dp, DeltaSidecar(index_digest=index.digest, deltas=deltas, task="causal-lm"))
    return fixture_models["gpt2"], ip, dp


def _names(folder):
    return sorted(os.listdir(folder))


def test_merge_to_onnx_writes_both_folders_and_checks_with_final_paths(sidecars, tmp_path):
    model, ip, dp = sidecars
    seen = []
    r = pipeline.merge_to_onnx(model, ip, dp, tmp_path / "onnx", merged_output=tmp_path / "merged",
                               check=lambda m, o: seen.append((m, o)) or "checked")
    assert r.checked == "checked" and seen == [(tmp_path / "merged", tmp_path / "onnx")]
    assert r.export.model_path == tmp_path / "onnx" / "model.onnx" and r.export.model_path.is_file()
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert _names(tmp_path) == ["merged", "onnx"]  # no temporaries left


def test_failed_export_keeps_the_old_output_and_leaves_no_temporaries(sidecars, tmp_path, monkeypatch):
    model, ip, dp = sidecars
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "old.txt").write_text("previous export")

    def boom(*args, **kwargs):
        raise ModelError("torch.onnx.export failed: simulated")

    monkeypatch.setattr(onnx_export, "run_exporter", boom)
    with pytest.raises(ModelError, match="simulated"):
        pipeline.merge_to_onnx(model, ip, dp, out, force=True)
    assert _names(tmp_path) == ["onnx"] and _names(out) == ["old.txt"]


def test_existing_output_is_refused_before_anything_is_written(sidecars, tmp_path):
    model, ip, dp = sidecars
    (tmp_path / "onnx").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        pipeline.merge_to_onnx(model, ip, dp, tmp_path / "onnx")
    with pytest.raises(OutputError, match="must differ"):
        pipeline.merge_to_onnx(model, ip, dp, tmp_path / "x", merged_output=tmp_path / "x")
    assert _names(tmp_path) == ["onnx"]
