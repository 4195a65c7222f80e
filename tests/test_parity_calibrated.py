"""Parity calibrated to the model (issue 25): the noise floor, the exact comparisons, and what they catch.

Each broken merge or export below must fail ``merge``'s check with one line; every correct one passes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from neuroada_tools.check.onnx_weights import check_onnx_weights
from neuroada_tools.check.parity import (
    NOISE_FACTOR,
    SCALE_RTOL,
    ParityReport,
    Tolerance,
    calibrated_tolerance,
    evaluated_in,
    make_fresh_inputs,
    run_torch,
)
from neuroada_tools.check.run import load_unmerged, run_check
from neuroada_tools.cli import main
from neuroada_tools.export import merge as merge_mod
from tests.test_merge import make_sidecars


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_calibrated_tolerance_worked_example():
    noise = ParityReport(max_abs=9.4e-5, max_rel=0.0, argmax_agreement=1.0, positions=30, ref_scale=35.0)
    assert calibrated_tolerance(noise) == Tolerance(NOISE_FACTOR * 9.4e-5, SCALE_RTOL)
    assert calibrated_tolerance(noise).limit(35.0) == pytest.approx(8 * 9.4e-5 + 1e-4 * 35)
    silent = ParityReport(max_abs=0.0, max_rel=0.0, argmax_agreement=1.0, positions=30, ref_scale=35.0)
    assert calibrated_tolerance(silent).limit(35.0) == pytest.approx(1e-4 * 35)  # never bit equality


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # fp32 and a bf16 base
def test_evaluated_in_float64_restores_every_tensor_bit_for_bit(fixture_models, tmp_path, arch):
    ip, dp, _, _ = make_sidecars(fixture_models[arch], tmp_path)
    model, _ = load_unmerged(fixture_models[arch], ip, dp)
    before = {n: t.clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    inputs = make_fresh_inputs(model.config, vocab_size=model.config.vocab_size)
    own = run_torch(model, inputs)
    with evaluated_in(model):
        assert all(p.dtype == torch.float64 for p in model.parameters())
        assert run_torch(model, inputs).dtype == torch.float64
    after = dict([*model.named_parameters(), *model.named_buffers()])
    for n, t in before.items():
        assert after[n].dtype == t.dtype and torch.equal(after[n], t), n
    assert any("neuroada_delta" in n and t.dtype == torch.float32 for n, t in before.items())  # deltas stay fp32
    assert torch.equal(run_torch(model, inputs), own)


def test_a_correct_fp32_merge_is_exact_against_the_fused_bypass_and_reports_its_noise(fixture_models, tmp_path):
    ip, dp, _, _ = make_sidecars(fixture_models["llama"], tmp_path)
    out = tmp_path / "m"
    r = run_cli("merge", "--model", fixture_models["llama"], "--index", ip, "--delta", dp, "-o", out, "--json", "-q",
                "--generate", "4")
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)["parity"]
    fused = p["comparisons"]["merged_vs_fused"]
    assert fused["max_abs"] == 0.0 and fused["tolerance"] == 0
    noise = p["noise"]
    assert noise["calibrated"] and 0 < noise["max_abs"] < 1e-4 and noise["factor"] == NOISE_FACTOR
    merged = p["comparisons"]["merged_vs_unmerged"]
    assert merged["tolerance"] == pytest.approx(NOISE_FACTOR * noise["max_abs"] + SCALE_RTOL * noise["ref_scale"])
    assert merged["max_abs"] <= merged["tolerance"]


def _twice(monkeypatch):
    real = merge_mod.merge_tensor

    def wrong(stored, idx, delta, transposed, out_dtype, **kw):
        return real(real(stored, idx, delta, transposed, torch.float32, **kw), idx, delta, transposed, out_dtype, **kw)

    monkeypatch.setattr(merge_mod, "merge_tensor", wrong)


def _misplaced(monkeypatch, name: str):
    real = merge_mod.merge_tensor

    def wrong(stored, idx, delta, transposed, out_dtype, **kw):
        if kw.get("name") == name:
            idx = idx.clone()
            taken = set(idx[0].tolist())
            idx[0, 0] = next(c for c in range(idx.shape[1] + 1) if c not in taken)
            idx[0] = idx[0].sort().values
        return real(stored, idx, delta, transposed, out_dtype, **kw)

    monkeypatch.setattr(merge_mod, "merge_tensor", wrong)


@pytest.mark.parametrize("how", ["twice", "misplaced"])
def test_a_broken_fp32_merge_fails_the_exact_comparison_in_one_line(fixture_models, tmp_path, monkeypatch, how):
    ip, dp, _, _ = make_sidecars(fixture_models["llama"], tmp_path, scale=1e-3)  # small deltas
    if how == "twice":
        _twice(monkeypatch)
    else:
        _misplaced(monkeypatch, "model.layers.1.self_attn.o_proj.weight")
    r = run_cli("merge", "--model", fixture_models["llama"], "--index", ip, "--delta", dp, "-o", tmp_path / "bad", "-q")
    assert r.exit_code == 1, r.output
    assert re.fullmatch(r"error: parity check failed \(fp32\): merged_vs_fused: max abs \S+ > tolerance 0 .*",
                        one_line(r))


def _perturb_graph(src: Path, dst: Path, shape: tuple[int, ...]) -> str:
    """Copy ``src`` to ``dst`` with one value of the first float initializer of ``shape`` (either orientation)
    moved by one ulp; return its name."""
    model = onnx.load(str(src))
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype.kind == "f" and array.shape in (shape, shape[::-1]):
            array = array.copy()
            array.flat[0] = torch.nextafter(torch.tensor(array.flat[0]), torch.tensor(float("inf"))).item()
            init.CopyFrom(numpy_helper.from_array(array, init.name))
            onnx.save(model, str(dst))
            return init.name
    raise AssertionError(f"no initializer of shape {shape}")


def test_an_onnx_weight_one_ulp_off_fails_onnx_weights(fixture_models, tmp_path):
    base = fixture_models["llama"]
    ip, dp, _, _ = make_sidecars(base, tmp_path)
    out = tmp_path / "onnx"
    r = run_cli("merge", "--model", base, "--index", ip, "--delta", dp, "--to", "onnx", "--exporter", "torch",
                "-o", out, "--json", "-q")
    assert r.exit_code == 0, r.output
    weights = json.loads(r.stdout)["parity"]["onnx_weights"]
    assert weights["passed"] and weights["matched"] == weights["tensors"] > 0
    model, _ = load_unmerged(base, ip, dp)
    q = model.model.layers[0].self_attn.q_proj.weight
    _perturb_graph(out / "model.onnx", out / "model.onnx", tuple(q.shape))
    result = run_check(base, ip, dp, onnx_dir=out, raise_on_failure=False)
    assert result.comparisons["onnx_vs_unmerged"]["passed"]  # one ulp hides in the logits' noise...
    assert not result.passed and result.onnx_weights["matched"] == result.onnx_weights["tensors"] - 1  # ...not here
    r = run_cli("check", "--model", base, "--index", ip, "--delta", dp, "--onnx", out)
    assert r.exit_code == 1 and "onnx_weights" in r.output and "FAILED" in r.output
    with pytest.raises(Exception, match=r"onnx_weights: 1 of \d+ adapted weights not in the graph bit for bit "
                                        r"\(first: model\.onnx: model\.layers\.0\.self_attn\.q_proj\.weight\)"):
        run_check(base, ip, dp, onnx_dir=out)
    assert check_onnx_weights(model, [out / "model.onnx"], torch.float32)["missing"] == [
        "model.onnx: model.layers.0.self_attn.q_proj.weight"]
