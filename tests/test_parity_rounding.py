"""The tight fp32 check of a bf16/fp16 merge (check/rounding.py): the merged weights against
``fp32(lowp(fp32(W) + scatter(delta)))`` computed apart from the merge, both run in fp32.

The low-precision comparison's bound (bf16: 1e-3 + 0.1 x logit scale) is loose enough to pass a merge
with one delta entry at the wrong column; the tight one is not.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from transformers.pytorch_utils import Conv1D

from neuroada_tools.check.parity import TIGHT, TOLERANCES, tolerance_for
from neuroada_tools.check.rounding import reference_value
from neuroada_tools.check.run import run_check
from neuroada_tools.cli import main
from neuroada_tools.export import merge as merge_mod
from neuroada_tools.export.merge import merge_to_folder
from neuroada_tools.index.build import run_index
from neuroada_tools.io.checkpoint import open_checkpoint
from neuroada_tools.io.sidecar import DeltaSidecar, IndexSidecar, TensorEntry, read_index, write_delta
from neuroada_tools.train import bypass

MISPLACED = "model.layers.0.mlp.down_proj.weight"  # in the bf16 fixture qwen2


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def sidecars(model: Path, tmp: Path, seed: int = 0) -> tuple[Path, Path]:
    """A k=3 index of ``model`` and a random delta of scale 0.05 (plus a 3-class head for BERT)."""
    ip, dp = tmp / "m.index.safetensors", tmp / "m.delta.safetensors"
    run_index(model, 3, ip, force=True)
    index = read_index(ip)
    g = torch.Generator().manual_seed(seed)
    deltas = {n: torch.randn(t.shape, generator=g) * 0.05 for n, t in index.indices.items()}
    dense, task, info = {}, "causal-lm", {}
    cfg = json.loads((model / "config.json").read_text())
    if cfg["model_type"] == "bert":
        h = cfg["hidden_size"]
        dense = {"classifier.weight": torch.randn(3, h, generator=g) * 0.2, "classifier.bias": torch.randn(3) * 0.1}
        task, info = "classification", {"num_labels": 3, "label_names": ["a", "b", "c"]}
    write_delta(dp, DeltaSidecar(index.digest, deltas, dense, task, info))
    return ip, dp


def test_tight_tolerance_in_every_dtype_row():
    for key in ("fp32", "bf16", "fp16"):
        assert TOLERANCES[key]["tight"] is TIGHT and tolerance_for(key, "tight") is TIGHT
    assert TIGHT.rtol <= 1e-5 and TIGHT.atol <= 1e-6
    assert TIGHT.rtol * 100 < TOLERANCES["fp16"]["merged"].rtol < TOLERANCES["bf16"]["merged"].rtol


def _adapted_layer(module: nn.Module, weight: list[list[float]], idx: list[list[int]],
                   delta: list[list[float]]) -> nn.Module:
    """``module`` holding the stored ``weight``, with a bypass of ``idx`` / ``delta`` attached as the
    unmerged model has it (reference mode: the weight stays the base)."""
    with torch.no_grad():
        module.weight.copy_(torch.tensor(weight))
    layout = "out_in" if isinstance(module, nn.Linear) else "in_out"
    shape = tuple(module.weight.shape) if layout == "out_in" else tuple(module.weight.shape[::-1])
    index = IndexSidecar(k=len(idx[0]), criterion="magnitude",
                         indices={"0.weight": torch.tensor(idx, dtype=torch.int32)},
                         entries={"0.weight": TensorEntry(shape, layout, "F32", "0" * 64)})
    wrapper = nn.Sequential(module)
    bypass.attach(wrapper, index, mode="reference")
    with torch.no_grad():
        wrapper[0].neuroada_delta.copy_(torch.tensor(delta))
    return wrapper[0]


def test_reference_value_worked_example():
    """The docstring's example: bf16 ``[[1.0, 0.5]]``, idx ``[[1]]``, delta 2**-10 or 2**-7."""
    small = _adapted_layer(nn.Linear(2, 1, bias=False).to(torch.bfloat16), [[1.0, 0.5]], [[1]], [[2.0**-10]])
    assert reference_value(small.weight, torch.bfloat16, small).tolist() == [[1.0, 0.5]]  # below bf16 resolution
    assert reference_value(small.weight, torch.float32, small).tolist() == [[1.0, 0.5009765625]]
    big = _adapted_layer(nn.Linear(2, 1, bias=False).to(torch.bfloat16), [[1.0, 0.5]], [[1]], [[2.0**-7]])
    assert reference_value(big.weight, torch.bfloat16, big).tolist() == [[1.0, 0.5078125]]
    assert reference_value(big.weight, torch.bfloat16).tolist() == [[1.0, 0.5]]  # not adapted: the base, cast
    # Conv1D stores [in, out]: logical row 0, column 1 is stored row 1, column 0
    conv = _adapted_layer(Conv1D(1, 2), [[1.0], [0.5]], [[1]], [[0.25]])
    assert reference_value(conv.weight, torch.float16, conv).tolist() == [[1.0], [0.75]]
    assert conv.weight.tolist() == [[1.0], [0.5]]  # the base is left as it was


@pytest.mark.parametrize(("arch", "dtype"), [("qwen2", None), ("llama-fp16", None), ("gpt2", "fp16"),
                                             ("bert-base", "bf16")])
def test_a_correct_low_precision_merge_is_exact_in_fp32(fixture_models, tmp_path, arch, dtype):
    """bf16 / fp16 as stored, Conv1D, and a dense head under the task model's names: difference 0."""
    ip, dp = sidecars(fixture_models[arch], tmp_path)
    merge_to_folder(fixture_models[arch], ip, dp, tmp_path / "out", dtype=dtype)
    r = run_check(fixture_models[arch], ip, dp, merged_dir=tmp_path / "out", raise_on_failure=False)
    tight = r.comparisons["merged_vs_unmerged_fp32"]
    assert tight["max_abs"] == 0.0 and tight["passed"] and tight["argmax_agreement"] == 1.0, tight
    assert 0 < tight["tolerance"] < 1e-4


def test_fp32_merges_have_no_tight_comparison(fixture_models, tmp_path):
    ip, dp = sidecars(fixture_models["mistral"], tmp_path)
    merge_to_folder(fixture_models["mistral"], ip, dp, tmp_path / "out")
    assert list(run_check(fixture_models["mistral"], ip, dp, merged_dir=tmp_path / "out").comparisons) == [
        "merged_vs_fused", "merged_vs_unmerged"
    ]


def _misplace_one_entry(monkeypatch) -> None:
    """Merge with the first delta entry of row 0 of ``MISPLACED`` added at a column the index does not name."""
    real = merge_mod.merge_tensor

    def wrong(stored, idx, delta, transposed, out_dtype, *, name="tensor", **kw):
        if name == MISPLACED:
            idx = idx.clone()
            taken = set(idx[0].tolist())
            idx[0, 0] = next(c for c in range(stored.shape[1]) if c not in taken)
            idx[0] = idx[0].sort().values
        return real(stored, idx, delta, transposed, out_dtype, name=name, **kw)

    monkeypatch.setattr(merge_mod, "merge_tensor", wrong)


def test_one_misplaced_entry_in_a_bf16_merge_fails_the_exact_and_tight_ones(fixture_models, tmp_path, monkeypatch):
    base = fixture_models["qwen2"]  # bf16
    ip, dp = sidecars(base, tmp_path)
    merge_to_folder(base, ip, dp, tmp_path / "good")
    _misplace_one_entry(monkeypatch)
    out = tmp_path / "bad"
    r = run_cli("merge", "--model", base, "--index", ip, "--delta", dp, "-o", out, "-q")
    assert r.exit_code == 1, r.output
    line = r.stderr.strip()
    assert "\n" not in line and re.fullmatch(
        r"error: parity check failed \(bf16\): merged_vs_fused: max abs \S+ > tolerance 0 .*"
        r"merged_vs_unmerged_fp32: max abs \S+ > tolerance \S+ .*", line
    ), line
    # exactly one entry moved: two values differ from the correct merge, in one row of one tensor
    good, bad = open_checkpoint(tmp_path / "good"), open_checkpoint(out)
    changed = {n: (good.read(n) != bad.read(n)).nonzero().tolist() for n in good.tensors}
    changed = {n: v for n, v in changed.items() if v}
    assert list(changed) == [MISPLACED] and len(changed[MISPLACED]) == 2
    assert {row for row, _ in changed[MISPLACED]} == {0}

    result = run_check(base, ip, dp, merged_dir=out, raise_on_failure=False)
    assert result.dtype == "bf16"
    fused, tight = result.comparisons["merged_vs_fused"], result.comparisons["merged_vs_unmerged_fp32"]
    assert not fused["passed"] and fused["tolerance"] == 0
    assert not tight["passed"] and tight["max_abs"] > 10 * tight["tolerance"]
    # the old fixed bf16 bound (1e-3 + 0.1 x scale) alone lets this merge through
    old = TOLERANCES["bf16"]["merged"]
    loose = result.comparisons["merged_vs_unmerged"]
    assert loose["max_abs"] <= old.atol + old.rtol * 7
    r = run_cli("check", "--model", base, "--index", ip, "--delta", dp, "--merged", out)
    assert r.exit_code == 1 and re.search(r"merged_vs_unmerged_fp32 +max abs .* FAILED", r.output)


@pytest.mark.parametrize("arch", ["qwen2", "llama-fp16"])
def test_double_rounding_passes_the_low_precision_bound_but_not_the_tight_one(fixture_models, tmp_path, monkeypatch,
                                                                             arch):
    """``lowp(W + lowp(delta))`` instead of ``lowp(W + delta)``: a rounding slip only the fp32 check sees."""
    base = fixture_models[arch]
    ip, dp = sidecars(base, tmp_path)
    real = merge_mod.merge_tensor
    monkeypatch.setattr(merge_mod, "merge_tensor", lambda stored, idx, delta, transposed, out_dtype, **kw: real(
        stored, idx, delta.to(out_dtype), transposed, out_dtype, **kw))
    merge_to_folder(base, ip, dp, tmp_path / "out")
    c = run_check(base, ip, dp, merged_dir=tmp_path / "out", raise_on_failure=False).comparisons
    assert c["merged_vs_unmerged"]["passed"]
    assert not c["merged_vs_unmerged_fp32"]["passed"], c


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_bf16_merge_of_an_fp32_base_is_held_to_the_bf16_tolerance(fixture_models, tmp_path, name):
    # was: the loose comparison keyed on the base's dtype (fp32: 1e-5), so every such merge failed
    ip, dp = sidecars(fixture_models[name], tmp_path)
    out = tmp_path / "merged"
    r = run_cli("merge", "--model", fixture_models[name], "--index", ip, "--delta", dp, "--to", "safetensors",
                "--dtype", "bf16", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    result = run_check(fixture_models[name], ip, dp, merged_dir=out, raise_on_failure=False)
    loose = result.comparisons["merged_vs_unmerged"]
    assert loose["passed"] and loose["tolerance"] > 1e-3  # the bf16 row, not fp32's 1e-5
    assert result.comparisons["merged_vs_unmerged_fp32"]["passed"]  # and the tight check still runs
