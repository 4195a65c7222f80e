"""onnx_export.py: export the fixture models, then check ONNX Runtime against torch.

Parity always runs on fresh inputs whose batch size and length differ from the export's example
inputs, with right padding (see DESIGN.md, "ONNX"). Exports are slow (seconds each), so each model
is exported once per module by the `exported` fixture and shared.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import onnx
import pytest
import torch

from neuroada_tools.check.parity import (
    TOLERANCES,
    assert_within,
    check_with_past,
    compare_logits,
    make_fresh_inputs,
    run_onnx,
    run_torch,
)
from neuroada_tools.errors import ModelError, OutputError, ParityError
from neuroada_tools.export import onnx_export
from neuroada_tools.export.onnx_export import MODEL_FILE, MODEL_WITH_PAST_FILE, OPSET, export_onnx
from neuroada_tools.export.onnx_wrappers import EXPORT_BATCH, EXPORT_SEQ
from neuroada_tools.hf import load_complete as load_model
from neuroada_tools.hf.signature import uses_token_type_ids

ONNX_TOL = TOLERANCES["fp32"]["onnx"]
DECODERS = ["llama", "gpt2"]
# name -> export_onnx keyword arguments. gpt2 is forced onto the external-data path (both graphs).
EXPORTS = {
    "llama": {"with_past": True},
    "gpt2": {"with_past": True, "external_data": True},
    "bert-cls": {},
    "qwen2": {},  # bf16 checkpoint, exported in fp32 by default
    "llama-fp16": {"dtype": "keep"},
}


@pytest.fixture(scope="module")
def exported(fixture_models, tmp_path_factory):
    """name -> (ExportResult, progress lines), exported on first use."""
    done: dict[str, tuple] = {}
    root = tmp_path_factory.mktemp("onnx")

    def get(name: str):
        if name not in done:
            lines: list[str] = []
            result = export_onnx(fixture_models[name], root / name, progress=lines.append, **EXPORTS[name])
            done[name] = (result, lines)
        return done[name][0]

    get.progress = lambda name: done[name][1]
    get.root = root
    return get


def fresh(model, *, batch: int, seq: int, seed: int):
    return make_fresh_inputs(
        model.config,
        batch=batch,
        seq=seq,
        seed=seed,
        pad_token_id=model.config.pad_token_id,
        with_token_type_ids=uses_token_type_ids(model),
    )


def graph_io(path: Path) -> tuple[dict, dict]:
    """name -> list of dims (int or symbolic name) for the inputs and the outputs of a graph."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return {v.name: dims(v) for v in graph.input}, {v.name: dims(v) for v in graph.output}


# --------------------------------------------------------------------------- names and shapes


@pytest.mark.parametrize(
    ("name", "inputs", "logits_dims"),
    [
        ("llama", ["input_ids", "attention_mask"], ["batch", "sequence", "vocab"]),
        ("gpt2", ["input_ids", "attention_mask"], ["batch", "sequence", "vocab"]),
        ("bert-cls", ["input_ids", "attention_mask", "token_type_ids"], ["batch", 2]),
    ],
)
def test_graph_names_and_dynamic_axes(exported, fixture_models, name, inputs, logits_dims):
    result = exported(name)
    assert result.model_path == result.out_dir / MODEL_FILE and result.model_path.is_file()
    assert result.input_names == inputs and result.output_names == ["logits"]
    ins, outs = graph_io(result.model_path)
    assert list(ins) == inputs and list(outs) == ["logits"]
    for dims in ins.values():
        assert dims == ["batch", "sequence"]
    vocab = json.loads((fixture_models[name] / "config.json").read_text()).get("vocab_size")
    assert outs["logits"] == [vocab if d == "vocab" else d for d in logits_dims]
    model = onnx.load(str(result.model_path), load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import}[""] == OPSET


@pytest.mark.parametrize("name", DECODERS)
def test_with_past_graph_names(exported, fixture_models, name):
    result = exported(name)
    config = json.loads((fixture_models[name] / "config.json").read_text())
    layers = config.get("num_hidden_layers") or config["n_layer"]
    heads = config.get("num_key_value_heads") or config.get("n_head")
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    assert result.with_past_path == result.out_dir / MODEL_WITH_PAST_FILE
    assert result.with_past_input_names == ["input_ids", "attention_mask", *past]
    assert result.with_past_output_names == ["logits", *present]
    ins, outs = graph_io(result.with_past_path)
    assert list(ins) == result.with_past_input_names and list(outs) == result.with_past_output_names
    assert ins["input_ids"] == ["batch", "sequence"]
    assert ins["attention_mask"] == ["batch", "total_sequence"]
    batch, kv_heads, past_len, head_dim = ins["past_key_values.0.key"]
    assert (batch, kv_heads, past_len) == ("batch", heads, "past_sequence") and isinstance(head_dim, int)
    assert outs["present.0.value"][2] == "past_sequence + sequence"


# --------------------------------------------------------------------------- parity on fresh shapes


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert-cls"])
@pytest.mark.parametrize(("batch", "seq", "seed"), [(3, 11, 0), (5, 4, 1)])
def test_onnx_matches_torch_on_fresh_padded_inputs(exported, fixture_models, name, batch, seq, seed):
    assert (batch, seq) != (EXPORT_BATCH, EXPORT_SEQ)
    result = exported(name)
    model, _ = load_model(fixture_models[name])
    inputs = fresh(model, batch=batch, seq=seq, seed=seed)
    mask = inputs["attention_mask"]
    assert (mask.sum(dim=1) < seq).any()
    report = compare_logits(run_torch(model, inputs), run_onnx(result.model_path, inputs), mask)
    assert_within(report, ONNX_TOL, f"{name} model.onnx vs torch")
    assert report.argmax_agreement == 1.0
    assert report.positions == (batch if name == "bert-cls" else int(mask.sum()))


@pytest.mark.parametrize("name", DECODERS)
def test_with_past_prefill_and_step_match_torch(exported, fixture_models, name):
    result = exported(name)
    model, _ = load_model(fixture_models[name])
    inputs = fresh(model, batch=3, seq=7, seed=3)
    report = check_with_past(model, result.with_past_path, inputs)
    assert report.positions == int(inputs["attention_mask"].sum()) + 3  # real prompt tokens + one step per row
    assert_within(report, ONNX_TOL, f"{name} model_with_past.onnx vs torch")
    assert report.argmax_agreement == 1.0


def test_with_past_graph_continues_a_longer_past(exported, fixture_models):
    """Step with a past longer than any seen at export (5): the past axis is really dynamic."""
    result = exported("llama")
    model, _ = load_model(fixture_models["llama"])
    report = check_with_past(model, result.with_past_path, fresh(model, batch=2, seq=23, seed=9))
    assert_within(report, ONNX_TOL, "llama with past, long prompt")


def test_perturbed_model_fails_onnx_parity(exported, fixture_models):
    result = exported("llama")
    model, _ = load_model(fixture_models["llama"])
    with torch.no_grad():
        model.lm_head.weight[11, 3] += 1e-2
    inputs = fresh(model, batch=3, seq=9, seed=5)
    report = compare_logits(run_torch(model, inputs), run_onnx(result.model_path, inputs), inputs["attention_mask"])
    assert report.max_abs > 10 * ONNX_TOL.atol
    with pytest.raises(ParityError, match=r"^llama: max abs logit difference .* argmax agreement"):
        assert_within(report, ONNX_TOL, "llama")


# --------------------------------------------------------------------------- dtypes


def test_bf16_model_exports_fp32_and_matches_its_upcast(exported, fixture_models):
    result = exported("qwen2")
    assert result.dtype == "float32"
    graph = onnx.load(str(result.model_path), load_external_data=False).graph
    assert not any(i.data_type == onnx.TensorProto.BFLOAT16 for i in graph.initializer)
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    model, _ = load_model(fixture_models["qwen2"])
    assert next(model.parameters()).dtype == torch.bfloat16
    inputs = fresh(model, batch=3, seq=10, seed=6)
    onnx_logits = run_onnx(result.model_path, inputs)
    mask = inputs["attention_mask"]
    upcast = run_torch(copy.deepcopy(model).float(), inputs)
    assert_within(compare_logits(upcast, onnx_logits, mask), ONNX_TOL, "qwen2 onnx vs fp32 upcast")
    # against the bf16 forward itself only the bf16 tolerance holds
    assert_within(compare_logits(run_torch(model, inputs), onnx_logits, mask), TOLERANCES["bf16"]["onnx"], "bf16")


def test_keep_dtype_exports_fp16_within_fp16_tolerance(exported, fixture_models):
    result = exported("llama-fp16")
    assert result.dtype == "float16"
    graph = onnx.load(str(result.model_path), load_external_data=False).graph
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    model, _ = load_model(fixture_models["llama-fp16"])
    inputs = fresh(model, batch=3, seq=10, seed=7)
    report = compare_logits(run_torch(model, inputs), run_onnx(result.model_path, inputs), inputs["attention_mask"])
    assert_within(report, TOLERANCES["fp16"]["onnx"], "fp16 onnx vs fp16 torch")


# --------------------------------------------------------------------------- files


def test_copies_config_and_tokenizer_and_leaves_no_temp_folder(exported, fixture_models):
    result = exported("llama")
    src = fixture_models["llama"]
    expected = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}
    assert expected <= set(result.copied_files)
    for name in result.copied_files:
        assert (result.out_dir / name).read_bytes() == (src / name).read_bytes()
    assert not list(result.out_dir.glob("*.safetensors"))
    # with past: both graphs read one shared data file (one copy of the weights, export/onnx_shared.py)
    assert [p.name for p in result.out_dir.glob("*.data")] == ["model.onnx.data"] and result.external_data
    plain = exported("bert-cls")
    assert not list(plain.out_dir.glob("*.data")) and not plain.external_data  # small model: weights inside
    assert [p.name for p in result.out_dir.parent.iterdir() if p.name.startswith(".")] == []
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(result.out_dir)
    assert tok("hello world")["input_ids"]
    assert any("model.onnx" in line for line in exported.progress("llama"))


def test_external_data_graphs_check_and_run(exported, fixture_models):
    result = exported("gpt2")
    assert result.external_data
    assert [p.name for p in result.out_dir.glob("*.data")] == ["model.onnx.data"]  # shared by both graphs
    for path in (result.model_path, result.with_past_path):
        inits = onnx.load(str(path), load_external_data=False).graph.initializer
        external = [i for i in inits if i.data_location == onnx.TensorProto.EXTERNAL]
        assert any(i.name.endswith("c_fc.weight") for i in external)  # the big weights live in .data
        assert {e.value for i in external for e in i.external_data if e.key == "location"} == {"model.onnx.data"}
        onnx.checker.check_model(str(path))
    # the folder works after being moved: data files are referenced relative to the graph
    moved = exported.root / "gpt2-moved"
    shutil.copytree(result.out_dir, moved)
    model, _ = load_model(fixture_models["gpt2"])
    inputs = fresh(model, batch=4, seq=6, seed=8)
    report = compare_logits(run_torch(model, inputs), run_onnx(moved / MODEL_FILE, inputs), inputs["attention_mask"])
    assert_within(report, ONNX_TOL, "gpt2 external data")


# --------------------------------------------------------------------------- refusals


def test_refuses_existing_output_and_output_inside_model(fixture_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(OutputError, match="exists and is not empty"):
        export_onnx(fixture_models["gpt2"], out)
    model_copy = tmp_path / "model"
    shutil.copytree(fixture_models["gpt2"], model_copy)
    with pytest.raises(OutputError, match="inside the model folder"):
        export_onnx(model_copy, model_copy / "onnx")


def test_refuses_with_past_for_a_classifier(fixture_models, tmp_path):
    with pytest.raises(ModelError, match="with_past needs a causal LM; this is a classification model"):
        export_onnx(fixture_models["bert-cls"], tmp_path / "out", with_past=True)
    assert not (tmp_path / "out").exists()


def test_refuses_unknown_task_and_missing_head(fixture_models, tmp_path):
    with pytest.raises(ModelError, match=r"cannot tell the task from architectures \['BertModel'\]"):
        export_onnx(fixture_models["bert-base"], tmp_path / "out")
    with pytest.raises(ModelError, match=r"lacks weights BertForSequenceClassification needs \(classifier.bias"):
        export_onnx(fixture_models["bert-base"], tmp_path / "out", task="classification")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        export_onnx(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ModelError, match="dtype 'fp8'"):
        export_onnx(fixture_models["gpt2"], tmp_path / "out", dtype="fp8")
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]


def test_refuses_with_past_for_sliding_window_cache_before_exporting(tmp_path, monkeypatch):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=4,
    )
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(tmp_path / "mistral")
    monkeypatch.setattr(onnx_export, "run_exporter", lambda *a, **k: pytest.fail("exported before refusing"))
    with pytest.raises(ModelError, match="only full-attention cache layers .* DynamicSlidingWindowLayer"):
        export_onnx(tmp_path / "mistral", tmp_path / "out", with_past=True)


def test_failed_export_leaves_nothing_behind(fixture_models, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise ModelError("torch.onnx.export failed: simulated")

    monkeypatch.setattr(onnx_export, "run_exporter", boom)
    with pytest.raises(ModelError, match="simulated"):
        export_onnx(fixture_models["gpt2"], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_multiple_choice_model_exports_with_a_dynamic_choice_axis(fixture_models, tmp_path):
    from transformers import AutoConfig, BertForMultipleChoice

    config = AutoConfig.from_pretrained(fixture_models["bert-base"])
    torch.manual_seed(0)
    BertForMultipleChoice(config).save_pretrained(tmp_path / "mc")
    result = export_onnx(tmp_path / "mc", tmp_path / "out")
    assert result.task == "multiple-choice"
    ins, outs = graph_io(result.model_path)
    assert ins == {n: ["batch", "num_choices", "sequence"] for n in ("input_ids", "attention_mask", "token_type_ids")}
    assert outs == {"logits": ["batch", "num_choices"]}
    model, _ = load_model(tmp_path / "mc")
    flat = fresh(model, batch=4, seq=9, seed=10)
    inputs = {k: torch.stack([v, v.roll(1, dims=0)], dim=1) for k, v in flat.items()}  # 2 choices (export: 3)
    logits = run_onnx(result.model_path, inputs)
    assert logits.shape == (4, 2)
    report = compare_logits(run_torch(model, inputs), logits, torch.ones(4))
    assert_within(report, ONNX_TOL, "multiple choice")
