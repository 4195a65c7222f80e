"""parity.py: logit comparison over real positions, the tolerance table, fresh inputs and runners.

ONNX export itself, and ONNX-vs-torch parity of exported models, are in test_onnx_export.py; the
runner tests here use a hand-built ONNX graph so they need no exporter.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from neuroada_tools.check.parity import (
    PARITY_BATCH,
    PARITY_SEQ,
    TOLERANCES,
    ParityReport,
    Tolerance,
    assert_within,
    compare_logits,
    make_fresh_inputs,
    run_onnx,
    run_torch,
    tolerance_for,
)
from neuroada_tools.errors import ModelError, ParityError
from neuroada_tools.export.onnx_wrappers import EXPORT_BATCH, EXPORT_SEQ
from neuroada_tools.hf import load_complete as load_model
from neuroada_tools.hf.signature import position_ids_from_mask

# --------------------------------------------------------------------------- compare_logits


def test_compare_logits_worked_example_from_docstring():
    ref = torch.tensor([[[0.0, 2.0], [9.0, 9.0]]])
    other = torch.tensor([[[0.0, 2.1], [-9.0, 5.0]]])
    report = compare_logits(ref, other, torch.tensor([[1, 0]]))
    assert report.positions == 1
    assert report.max_abs == pytest.approx(0.1)
    assert report.max_rel == pytest.approx(0.05)
    assert report.argmax_agreement == 1.0
    assert report.ref_scale == 2.0


def test_compare_logits_ignores_padded_positions():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 6, 17, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    other = ref.clone()
    other[mask == 0] = 1e6 * torch.randn(int((mask == 0).sum()), 17, generator=gen)  # wildly wrong, but padded
    report = compare_logits(ref, other, mask)
    assert report.max_abs == 0.0
    assert report.max_rel == 0.0
    assert report.argmax_agreement == 1.0
    assert report.positions == 10
    # the same garbage on one real position is seen
    other[1, 2] += 1.0
    assert compare_logits(ref, other, mask).max_abs == pytest.approx(1.0)


def test_compare_logits_classification_uses_every_row():
    ref = torch.tensor([[1.0, -1.0], [0.5, 2.0], [3.0, 0.0]])
    other = ref.clone()
    other[2, 0] = 2.0  # row 2's argmax still 0
    other[1] = torch.tensor([2.5, 0.5])  # row 1's argmax flips
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])  # ignored for [B, C] logits
    report = compare_logits(ref, other, mask)
    assert report.positions == 3
    assert report.max_abs == pytest.approx(2.0)
    assert report.argmax_agreement == pytest.approx(2 / 3)
    assert report.max_rel == pytest.approx(1.0)  # row 1: 2.0 / max(|0.5|, |2.0|)


def test_compare_logits_step_logits_use_last_mask_columns():
    ref = torch.zeros(2, 1, 4)
    other = torch.full((2, 1, 4), 0.25)
    step_mask = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]])
    report = compare_logits(ref, other, step_mask)
    assert report.positions == 2
    assert report.max_abs == pytest.approx(0.25)


def test_compare_logits_rejects_shape_mismatch_and_empty_mask():
    with pytest.raises(ParityError, match=r"shapes differ: reference \(1, 2, 3\), other \(1, 2, 4\)"):
        compare_logits(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.ones(1, 2))
    with pytest.raises(ParityError, match="all padding"):
        compare_logits(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3))
    with pytest.raises(ParityError, match="does not cover"):
        compare_logits(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.ones(2, 2))


def test_nan_logits_never_pass():
    ref = torch.zeros(1, 2, 3)
    other = ref.clone()
    other[0, 1, 2] = float("nan")
    report = compare_logits(ref, other, torch.ones(1, 2))
    with pytest.raises(ParityError, match="nan"):
        assert_within(report, 1.0, "onnx vs torch")


# --------------------------------------------------------------------------- assert_within, tolerances


def test_assert_within_message_is_one_line_with_the_numbers():
    report = ParityReport(max_abs=3.2e-3, max_rel=1.5e-3, argmax_agreement=0.95, positions=40, ref_scale=2.1)
    with pytest.raises(ParityError) as info:
        assert_within(report, TOLERANCES["fp32"]["onnx"], "model.onnx vs unmerged")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg == (
        "model.onnx vs unmerged: max abs logit difference 0.0032 exceeds tolerance 0.0001 "
        "(max rel 0.0015, argmax agreement 95.0% over 40 positions)"
    )
    assert info.value.exit_code == 1


def test_assert_within_passes_at_the_limit_and_scales_rtol():
    report = ParityReport(max_abs=1e-4, max_rel=0.0, argmax_agreement=1.0, positions=1, ref_scale=10.0)
    assert_within(report, TOLERANCES["fp32"]["onnx"], "x")  # equal to the limit passes
    assert_within(report, 1e-4, "x")  # a bare float is an absolute tolerance
    with pytest.raises(ParityError):
        assert_within(report, 9e-5, "x")
    big = ParityReport(max_abs=0.5, max_rel=0.05, argmax_agreement=1.0, positions=1, ref_scale=10.0)
    assert_within(big, Tolerance(atol=1e-3, rtol=0.1), "x")  # limit 1.001
    with pytest.raises(ParityError, match="exceeds tolerance 0.101"):
        assert_within(big, Tolerance(atol=1e-3, rtol=0.01), "x")


def test_tolerance_table():
    assert TOLERANCES["fp32"]["merged"] == Tolerance(1e-5)
    assert TOLERANCES["fp32"]["onnx"] == Tolerance(1e-4)
    for key in ("bf16", "fp16"):
        for kind in ("merged", "onnx"):
            tol = TOLERANCES[key][kind]
            assert tol.atol > 0 and tol.rtol > 0
    # fp16 has 3 more mantissa bits than bf16: its relative tolerance is tighter
    assert TOLERANCES["fp16"]["onnx"].rtol < TOLERANCES["bf16"]["onnx"].rtol
    assert tolerance_for(torch.bfloat16, "merged") is TOLERANCES["bf16"]["merged"]
    assert tolerance_for("fp32", "onnx") is TOLERANCES["fp32"]["onnx"]
    with pytest.raises(ModelError, match="no parity tolerance"):
        tolerance_for(torch.int8, "onnx")


@pytest.mark.parametrize(("name", "key"), [("qwen2", "bf16"), ("llama-fp16", "fp16")])
def test_low_precision_forward_is_within_its_tolerance_of_the_fp32_upcast(fixture_models, name, key):
    """The documented bf16/fp16 tolerances hold for the fixtures: lowp forward vs exact fp32 upcast."""
    model, _ = load_model(fixture_models[name])
    assert tolerance_for(next(model.parameters()).dtype, "onnx") is TOLERANCES[key]["onnx"]
    inputs = make_fresh_inputs(model.config, seed=4, pad_token_id=model.config.pad_token_id)
    low = run_torch(model, inputs)
    exact = run_torch(copy.deepcopy(model).float(), inputs)
    report = compare_logits(low, exact, inputs["attention_mask"])
    assert report.max_abs > TOLERANCES["fp32"]["onnx"].atol  # rounding is real: fp32 tolerances would fail
    assert_within(report, TOLERANCES[key]["onnx"], f"{name} {key} vs fp32")


# --------------------------------------------------------------------------- fresh inputs


def test_fresh_inputs_are_right_padded_and_deterministic():
    cfg = type("Cfg", (), {"vocab_size": 50})()
    a = make_fresh_inputs(cfg, batch=4, seq=9, seed=7, pad_token_id=3, with_token_type_ids=True)
    b = make_fresh_inputs(cfg, batch=4, seq=9, seed=7, pad_token_id=3, with_token_type_ids=True)
    assert set(a) == {"input_ids", "attention_mask", "token_type_ids"}
    for k in a:
        assert torch.equal(a[k], b[k])
        assert a[k].shape == (4, 9) and a[k].dtype == torch.int64
    ids, mask, tt = a["input_ids"], a["attention_mask"], a["token_type_ids"]
    lengths = mask.sum(dim=1)
    assert lengths[0] == 9 and lengths[-1] == 4 and (lengths < 9).any()
    for row, n in zip(mask, lengths):  # right padding: ones then zeros
        assert row[:n].all() and not row[n:].any()
    assert (ids[mask == 0] == 3).all()  # padded slots hold the pad id
    assert not (ids[mask == 1] == 3).any()  # real tokens never do
    assert ((ids >= 0) & (ids < 50)).all()
    assert not tt[mask == 0].any() and tt.max() == 1
    c = make_fresh_inputs(cfg, batch=4, seq=9, seed=8, pad_token_id=3, with_token_type_ids=False)
    assert "token_type_ids" not in c and not torch.equal(c["input_ids"], ids)


def test_fresh_inputs_differ_from_export_shapes():
    assert (PARITY_BATCH, PARITY_SEQ) != (EXPORT_BATCH, EXPORT_SEQ)
    assert PARITY_BATCH != EXPORT_BATCH and PARITY_SEQ != EXPORT_SEQ


def test_fresh_inputs_need_room_for_padding():
    cfg = type("Cfg", (), {"vocab_size": 50})()
    with pytest.raises(ValueError, match="batch >= 2"):
        make_fresh_inputs(cfg, batch=1, seq=9, seed=0, pad_token_id=None, with_token_type_ids=False)


def test_position_ids_from_mask():
    mask = torch.tensor([[1, 1, 1, 0, 0, 1], [0, 0, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask, 1).tolist() == [[3], [3]]
    assert position_ids_from_mask(mask, 6).tolist() == [[0, 1, 2, 1, 1, 3], [1, 1, 0, 1, 2, 3]]


# --------------------------------------------------------------------------- run_torch


def test_run_torch_returns_fp32_and_restores_train_mode(fixture_models):
    model, _ = load_model(fixture_models["qwen2"])  # bf16
    model.train()
    inputs = make_fresh_inputs(model.config, seed=1, pad_token_id=model.config.pad_token_id)
    inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])  # not taken by Qwen2: dropped
    logits = run_torch(model, inputs)
    assert logits.dtype == torch.float32
    assert logits.shape == (PARITY_BATCH, PARITY_SEQ, model.config.vocab_size)
    assert model.training
    assert torch.equal(run_torch(model, inputs), logits)  # eval mode: no dropout noise


def test_perturbed_weight_exceeds_merged_tolerance(fixture_models):
    """A 1e-2 change to one weight is what parity exists to catch."""
    model, _ = load_model(fixture_models["llama"])
    inputs = make_fresh_inputs(model.config, seed=2, pad_token_id=model.config.pad_token_id)
    reference = run_torch(model, inputs)
    assert compare_logits(reference, run_torch(model, inputs), inputs["attention_mask"]).max_abs == 0.0
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[5, 7] += 1e-2
    report = compare_logits(reference, run_torch(model, inputs), inputs["attention_mask"])
    assert report.max_abs > 10 * TOLERANCES["fp32"]["merged"].atol
    with pytest.raises(ParityError, match="merged vs unmerged: max abs logit difference"):
        assert_within(report, TOLERANCES["fp32"]["merged"], "merged vs unmerged")


# --------------------------------------------------------------------------- run_onnx (hand-built graph)


def _toy_graph(path: Path, *, id_type=TensorProto.INT64, output="logits") -> Path:
    """logits[b, t, 0] = input_ids[b, t] * attention_mask[b, t] (as float)."""
    nodes = [
        helper.make_node("Mul", ["input_ids", "attention_mask"], ["prod"]),
        helper.make_node("Cast", ["prod"], ["prod_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["prod_f", "axes"], [output]),
    ]
    graph = helper.make_graph(
        nodes,
        "toy",
        [
            helper.make_tensor_value_info("input_ids", id_type, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", id_type, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", "sequence", 1])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [1], [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_run_onnx_feeds_only_declared_inputs(tmp_path):
    path = _toy_graph(tmp_path / "toy.onnx")
    inputs = {
        "input_ids": torch.tensor([[3, 4, 5], [6, 7, 8]]),
        "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 0]]),
        "token_type_ids": torch.zeros(2, 3, dtype=torch.long),  # not declared: not fed
    }
    logits = run_onnx(path, inputs)
    assert logits.dtype == torch.float32
    assert logits[..., 0].tolist() == [[3.0, 4.0, 5.0], [6.0, 0.0, 0.0]]


def test_run_onnx_casts_to_declared_int_type(tmp_path):
    path = _toy_graph(tmp_path / "toy32.onnx", id_type=TensorProto.INT32)
    logits = run_onnx(path, {"input_ids": torch.tensor([[2, 3]]), "attention_mask": torch.tensor([[1, 1]])})
    assert logits[..., 0].tolist() == [[2.0, 3.0]]


def test_run_onnx_errors(tmp_path):
    path = _toy_graph(tmp_path / "toy.onnx")
    with pytest.raises(ModelError, match="needs input 'attention_mask'"):
        run_onnx(path, {"input_ids": torch.tensor([[1]])})
    with pytest.raises(ModelError, match="no output 'logits'"):
        run_onnx(_toy_graph(tmp_path / "scores.onnx", output="scores"), {"input_ids": torch.tensor([[1]]),
                                                                         "attention_mask": torch.tensor([[1]])})
    with pytest.raises(ModelError, match="no such ONNX file"):
        run_onnx(tmp_path / "missing.onnx", {})
    with pytest.raises(ModelError, match="expected 'cpu' or 'cuda'"):
        run_onnx(path, {}, provider="tpu")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="onnxruntime cannot load it"):
        run_onnx(tmp_path / "junk.onnx", {})


def test_run_onnx_cuda_needs_the_cuda_provider(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime here has CUDA")
    with pytest.raises(ModelError, match="provider 'cuda' asked for, but onnxruntime .* offers only"):
        run_onnx(_toy_graph(tmp_path / "toy.onnx"), {}, provider="cuda")


def test_run_onnx_output_matches_numpy(tmp_path):
    path = _toy_graph(tmp_path / "toy.onnx")
    ids = np.arange(12).reshape(3, 4)
    mask = (np.arange(4)[None, :] < np.array([[4], [2], [1]])).astype(np.int64)
    logits = run_onnx(path, {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)})
    assert np.array_equal(logits[..., 0].numpy(), (ids * mask).astype(np.float32))
