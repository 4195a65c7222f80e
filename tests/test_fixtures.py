"""The test fixtures themselves: each folder is a loadable Hugging Face model with the properties
the rest of the suite relies on (sharding, dtypes, Conv1D layout, checkpoint prefixes, ties in |W|),
and building is reproducible byte for byte across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
)
from transformers.pytorch_utils import Conv1D

from fixtures.build import NAMES, TIE_ROW_VALUES, build_all

REPO_ROOT = Path(__file__).resolve().parents[1]
DECODERS = ["llama", "qwen2", "mistral", "gpt2", "opt", "llama-fp16"]
DTYPES = {"qwen2": torch.bfloat16, "llama-fp16": torch.float16}
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Two plus three is five."]
PAIRS = (["This movie was wonderful.", "The food was good."], ["I loved it.", "The room was dirty and cold."])


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's checkpoint (single file or shards), by checkpoint name."""
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for key in f.keys():
                assert key not in out, f"{key} in two shards"
                out[key] = f.get_tensor(key)
    return out


def _load(name: str, folder: Path):
    if name in DECODERS:
        cls = AutoModelForCausalLM
    elif name == "bert-cls":
        cls = AutoModelForSequenceClassification
    else:
        cls = AutoModel
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    return model.eval(), info


def test_every_fixture_is_built(fixture_models):
    assert list(fixture_models) == NAMES
    for name, folder in fixture_models.items():
        files = {p.name for p in folder.iterdir()}
        assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= files, name
        assert any(f.endswith(".safetensors") for f in files), name
        size = sum(p.stat().st_size for p in folder.iterdir())
        assert size < 1_000_000, f"{name}: {size} bytes"
        if name in DECODERS:
            assert "generation_config.json" in files, name


@pytest.mark.parametrize("name", NAMES)
def test_loads_and_runs_a_padded_batch(fixture_models, name):
    folder = fixture_models[name]
    model, info = _load(name, folder)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.pad_token_id is not None
    assert model.config.vocab_size == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.dtype == DTYPES.get(name, torch.float32)

    if name.startswith("bert"):
        batch = tok(*PAIRS, padding=True, return_tensors="pt")
        assert set(batch["token_type_ids"].unique().tolist()) == {0, 1}
        single = tok(PAIRS[0][0], PAIRS[1][0], return_tensors="pt")
    else:
        batch = tok(TEXTS, padding=True, return_tensors="pt")
        assert "token_type_ids" not in batch
        single = tok(TEXTS[1], return_tensors="pt")
    assert (batch["attention_mask"] == 0).any(), "the batch should need padding"

    with torch.no_grad():
        out, alone = model(**batch), model(**single)
    result = out.last_hidden_state if name == "bert-base" else out.logits
    reference = alone.last_hidden_state if name == "bert-base" else alone.logits
    assert torch.isfinite(result).all()
    if name == "bert-cls":
        assert result.shape == (2, 2)
        row = 0
    else:
        assert result.shape[:2] == batch["input_ids"].shape
        row = 0 if name.startswith("bert") else 1
    if name in DECODERS:
        assert result.shape[-1] == len(tok)
    # The padded row agrees with the same sequence run alone (padding is masked correctly).
    n = int(single["attention_mask"].sum())
    got = result[row] if name == "bert-cls" else result[row, :n]
    want = reference[0] if name == "bert-cls" else reference[0, :n]
    atol = 1e-5 if name not in DTYPES else 5e-2
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=0)


def test_bert_base_loads_into_a_classifier(fixture_models):
    model, info = BertForSequenceClassification.from_pretrained(
        fixture_models["bert-base"], num_labels=2, output_loading_info=True
    )
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    base = _tensors(fixture_models["bert-base"])
    loaded = model.bert.state_dict()
    for key, value in base.items():
        torch.testing.assert_close(loaded[key], value, atol=0, rtol=0)
    tok = AutoTokenizer.from_pretrained(fixture_models["bert-base"])
    with torch.no_grad():
        logits = model.eval()(**tok(*PAIRS, padding=True, return_tensors="pt")).logits
    assert logits.shape == (2, 2)


def test_bert_checkpoint_prefixes(fixture_models):
    base = _tensors(fixture_models["bert-base"])
    assert "encoder.layer.0.attention.self.query.weight" in base
    assert not any(k.startswith("bert.") for k in base)
    config = json.loads((fixture_models["bert-base"] / "config.json").read_text())
    assert config["architectures"] == ["BertModel"]

    cls = _tensors(fixture_models["bert-cls"])
    assert "bert.encoder.layer.0.attention.self.query.weight" in cls
    assert cls["classifier.weight"].shape == (2, 32)
    assert all(k.startswith(("bert.", "classifier.")) for k in cls)


def test_gpt2_weights_are_conv1d_oriented(fixture_models):
    folder = fixture_models["gpt2"]
    tensors = _tensors(folder)
    n_embd = json.loads((folder / "config.json").read_text())["n_embd"]
    assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (n_embd, 3 * n_embd)  # [in, out]
    assert tensors["transformer.h.0.mlp.c_fc.weight"].shape == (n_embd, 4 * n_embd)
    assert tensors["transformer.h.0.mlp.c_proj.weight"].shape == (4 * n_embd, n_embd)
    assert "lm_head.weight" not in tensors  # tied to wte, not stored
    model, _ = _load("gpt2", folder)
    assert isinstance(model.transformer.h[0].mlp.c_fc, Conv1D)


def test_llama_is_sharded(fixture_models):
    folder = fixture_models["llama"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3
    assert not (folder / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                assert index["weight_map"][key] == shard.name
    tensors = _tensors(folder)
    assert set(tensors) == set(index["weight_map"])
    assert "lm_head.weight" in tensors  # tie_word_embeddings False


@pytest.mark.parametrize(
    ("name", "dtype", "label"), [("qwen2", torch.bfloat16, "bfloat16"), ("llama-fp16", torch.float16, "float16")]
)
def test_half_precision_fixtures(fixture_models, name, dtype, label):
    folder = fixture_models[name]
    assert json.loads((folder / "config.json").read_text())["dtype"] == label
    assert {t.dtype for t in _tensors(folder).values()} == {dtype}


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "llama-fp16"])
def test_projections_have_ties_and_non_square_shapes(fixture_models, name):
    tensors = _tensors(fixture_models[name])
    up = tensors["model.layers.0.mlp.up_proj.weight"]
    assert up.shape[0] != up.shape[1]
    k_proj = tensors["model.layers.0.self_attn.k_proj.weight"]
    assert k_proj.shape[0] < k_proj.shape[1]  # fewer kv heads than heads
    row = up[0].float()
    cols = list(TIE_ROW_VALUES)
    assert (row[cols].abs() == 0.5).all()
    assert (row[cols] > 0).any() and (row[cols] < 0).any()


@pytest.mark.parametrize(
    ("name", "key", "transposed"),
    [
        ("gpt2", "transformer.h.0.mlp.c_fc.weight", True),
        ("opt", "model.decoder.layers.0.fc1.weight", False),
        ("bert-cls", "bert.encoder.layer.0.intermediate.dense.weight", False),
        ("bert-base", "encoder.layer.0.intermediate.dense.weight", False),
    ],
)
def test_other_architectures_have_ties_in_output_neuron_0(fixture_models, name, key, transposed):
    weight = _tensors(fixture_models[name])[key]
    neuron = weight[:, 0] if transposed else weight[0]
    values = neuron[list(TIE_ROW_VALUES)]
    assert values.tolist() == list(TIE_ROW_VALUES.values())


def test_unknown_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="nope"):
        build_all(tmp_path, ["nope"])


def test_building_twice_is_byte_identical(fixture_models, tmp_path):
    # A second process with another hash seed: catches order that depends on hash-map iteration.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run(
        [sys.executable, "-m", "fixtures.build", str(tmp_path)],
        cwd=REPO_ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    for name, folder in fixture_models.items():
        first = sorted(p.name for p in folder.iterdir())
        second = sorted(p.name for p in (tmp_path / name).iterdir())
        assert first == second, name
        for file_name in first:
            a, b = (folder / file_name).read_bytes(), (tmp_path / name / file_name).read_bytes()
            assert a == b, f"{name}/{file_name} differs between two builds"
