"""`train-sparse` and `train.train` on the tiny fixtures: learning, outputs, determinism, resume, errors.

Every run is tiny (a few steps, batch 2, max length 32) so the whole file stays well under a
minute and a half on two CPU cores.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from neuroada_tools.cli import main
from neuroada_tools.errors import DataError, FingerprintError, ModelError, TrainingError
from neuroada_tools.index.build import run_index
from neuroada_tools.io.safetensors_file import read_all, read_header
from neuroada_tools.io.sidecar import read_delta, read_index
from neuroada_tools.train import bypass
from neuroada_tools.train import data as data_mod
from neuroada_tools.train import loop as train_mod
from neuroada_tools.train import steps as steps_mod
from neuroada_tools.train.loop import TrainConfig, state_path, train

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a little town by the sea.",
    "The capital of France is Paris.",
    "Red, green and blue are three colours.",
]
REVIEWS = [
    ("This movie was wonderful, the acting was great.", "pos"),
    ("This movie was terrible, the plot made no sense.", "neg"),
    ("I loved the music and the pictures.", "pos"),
    ("The room was dirty and the staff did not care.", "neg"),
]
SUMMARY_FIELDS = {
    "output", "state", "sha256", "task", "steps", "start_step", "total_steps", "epochs", "examples",
    "skipped_examples", "truncated_examples", "tokens", "target_tokens", "seconds", "first_loss",
    "last_loss", "trainable_parameters", "delta_parameters", "head_parameters", "lr", "seed", "device",
    "dtype", "label_names", "eval", "kernels", "world_size", "batch_size", "grad_accum", "global_batch",
    "base_bytes", "quantization",
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def work(fixture_models, tmp_path_factory) -> dict[str, Path]:
    """Indexes (k=4) for llama, gpt2 and bert-base, and small data files, shared by the tests."""
    d = tmp_path_factory.mktemp("train-inputs")
    out = {
        "text": write_jsonl(d / "text.jsonl", [{"text": t} for t in TEXTS * 2]),
        "cls": write_jsonl(d / "cls.jsonl", [{"text": t, "label": y} for t, y in REVIEWS * 2]),
        "cls_eval": write_jsonl(d / "cls-eval.jsonl", [{"text": t, "label": y} for t, y in REVIEWS]),
    }
    for name in ("llama", "gpt2", "bert-base"):
        out[f"index:{name}"] = d / f"{name}.k4.index.safetensors"
        run_index(fixture_models[name], 4, out[f"index:{name}"])
    return out


def cli(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["train-sparse", *[str(a) for a in args]], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def config(fixture_models, work, name: str, out: Path, data: str = "text", **kw) -> TrainConfig:
    base = dict(
        model=fixture_models[name], index=work[f"index:{name}"], data=work[data], output=out,
        batch_size=2, max_length=32, lr=1e-2, warmup_ratio=0.0, max_steps=6,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def capture(monkeypatch):
    """Records every model ``train`` loads, with a copy of its parameters as loaded."""
    seen: list[tuple[torch.nn.Module, dict[str, torch.Tensor]]] = []
    real = train_mod.load_model

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        seen.append((model, {n: p.detach().clone() for n, p in model.named_parameters()}))
        return model

    monkeypatch.setattr(train_mod, "load_model", spy)
    return seen


def changed_parameters(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    """Detach the bypasses, then name the parameters that differ from the loaded ones."""
    bypass.detach(model)
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    return {n for n in before if not torch.equal(before[n], after[n].detach().to(before[n].dtype))}


# ---------------------------------------------------------------- learning and outputs


def test_llama_causal_lm_cli_learns_and_writes_only_the_sidecars(fixture_models, work, tmp_path):
    model = fixture_models["llama"]  # sharded checkpoint
    base_before = folder_digest(model)
    out = tmp_path / "llama.delta.safetensors"
    code, stdout, stderr = cli(
        "--model", model, "--index", work["index:llama"], "--data", work["text"], "-o", out,
        "--max-steps", 20, "--batch-size", 2, "--max-length", 32, "--lr", 1e-2, "--seed", 3, "--json", "-q",
    )
    assert code == 0, stderr
    s = json.loads(stdout)
    assert set(s) == SUMMARY_FIELDS
    assert s["task"] == "causal-lm" and s["steps"] == 20 and s["start_step"] == 0 and s["total_steps"] == 20
    assert s["examples"] == 8 and s["epochs"] == 5 and s["tokens"] > s["target_tokens"] > 0
    assert s["last_loss"] < s["first_loss"] - 1.0, s
    assert s["trainable_parameters"] == s["delta_parameters"] == read_index(work["index:llama"]).trainable_parameters()
    assert s["head_parameters"] == 0 and s["eval"] is None and s["seconds"] > 0

    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama.delta.safetensors", "llama.state.safetensors"]
    assert folder_digest(model) == base_before  # the base is never written
    delta = read_delta(out, read_index(work["index:llama"]))
    assert delta.task == "causal-lm" and delta.dense == {}
    assert delta.info["steps"] == 20 and delta.info["seed"] == 3 and delta.info["lr"] == 1e-2
    assert all(t.dtype == torch.float32 for t in delta.deltas.values())
    assert all(bool(t.abs().sum() > 0) for t in delta.deltas.values())
    assert s["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()


def test_gpt2_conv1d_learns_and_changes_only_the_deltas(fixture_models, work, tmp_path, capture):
    s = train(config(fixture_models, work, "gpt2", tmp_path / "g.delta.safetensors", max_steps=20, lr=3e-2))
    assert len(s.losses) == 20
    assert sum(s.losses[-5:]) / 5 < sum(s.losses[:5]) / 5 - 0.5, s.losses
    model, before = capture[0]
    assert changed_parameters(model, before) == set()  # detach gives back the loaded base exactly
    delta = read_delta(tmp_path / "g.delta.safetensors", read_index(work["index:gpt2"]))
    assert all(bool(t.abs().sum() > 0) for t in delta.deltas.values())


def test_bert_base_classification_trains_and_saves_the_head(fixture_models, work, tmp_path, capture):
    model_dir = fixture_models["bert-base"]  # BertModel checkpoint: no "bert." prefix in it or in the index
    assert not any(n.startswith("bert.") for n in read_index(work["index:bert-base"]).indices)
    base_before = folder_digest(model_dir)
    out = tmp_path / "cls.delta.safetensors"
    code, stdout, stderr = cli(
        "--model", model_dir, "--index", work["index:bert-base"], "--data", work["cls"], "--eval-data",
        work["cls_eval"], "-o", out, "--max-steps", 8, "--batch-size", 2, "--max-length", 32, "--lr", 1e-2,
        "--warmup-ratio", 0, "--json",
    )
    assert code == 0, stderr
    s = json.loads(stdout)
    assert s["task"] == "classification" and s["label_names"] == ["neg", "pos"]
    assert s["head_parameters"] == 2 * 32 + 2 and s["trainable_parameters"] == s["delta_parameters"] + 66
    assert s["eval"]["examples"] == 4 and 0.0 <= s["eval"]["accuracy"] <= 1.0 and s["eval"]["loss"] > 0
    assert s["last_loss"] < s["first_loss"]

    delta = read_delta(out, read_index(work["index:bert-base"]))
    assert delta.task == "classification"
    assert sorted(delta.dense) == ["classifier.bias", "classifier.weight"]  # task-model names
    assert delta.dense["classifier.weight"].shape == (2, 32)
    assert delta.info["num_labels"] == 2 and delta.info["label_names"] == ["neg", "pos"]
    assert delta.info["steps"] == 8 and delta.info["label_field"] == "label"
    model, before = capture[0]
    assert changed_parameters(model, before) == {"classifier.weight", "classifier.bias"}
    assert folder_digest(model_dir) == base_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cls.delta.safetensors", "cls.state.safetensors"]


# ---------------------------------------------------------------- determinism and resume


def test_same_seed_and_data_give_identical_deltas(fixture_models, work, tmp_path):
    a, b = tmp_path / "a.delta.safetensors", tmp_path / "b.delta.safetensors"
    train(config(fixture_models, work, "llama", a, seed=7))
    train(config(fixture_models, work, "llama", b, seed=7))
    da, db = load_file(a), load_file(b)
    assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)
    assert a.read_bytes() == b.read_bytes()
    assert state_path(a).read_bytes() == state_path(b).read_bytes()


def test_interrupted_then_resumed_equals_straight(fixture_models, work, tmp_path):
    # bert classification: dropout (RNG state), a dense head, AdamW state, and epoch boundaries
    # (8 examples, batch 2, 2 micro-batches per step: 2 steps per epoch; the checkpoint at step 3
    # lies in the middle of epoch 1)
    kw = dict(data="cls", max_steps=7, grad_accum=2, warmup_ratio=0.3, weight_decay=0.01, seed=1)
    straight = tmp_path / "straight" / "s.delta.safetensors"
    straight.parent.mkdir()
    train(config(fixture_models, work, "bert-base", straight, **kw))

    resumed = tmp_path / "resumed" / "r.delta.safetensors"
    resumed.parent.mkdir()

    def crash(info):
        if info.step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(fixture_models, work, "bert-base", resumed, save_every=3, **kw), on_step=crash)
    assert read_delta(resumed).info["steps"] == 3
    assert sorted(p.name for p in resumed.parent.iterdir()) == ["r.delta.safetensors", "r.state.safetensors"]

    code, stdout, stderr = cli(
        "--model", fixture_models["bert-base"], "--index", work["index:bert-base"], "--data", work["cls"],
        "-o", resumed, "--max-steps", 7, "--batch-size", 2, "--grad-accum", 2, "--max-length", 32,
        "--lr", 1e-2, "--warmup-ratio", 0.3, "--weight-decay", 0.01, "--seed", 1, "--resume", "--json",
    )
    assert code == 0, stderr
    s = json.loads(stdout)
    assert s["start_step"] == 3 and s["steps"] == 7
    a, b = load_file(straight), load_file(resumed)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert a.keys() == b.keys() and differ == [], differ
    sa = read_all(state_path(straight), read_header(state_path(straight)), TrainingError)
    sb = read_all(state_path(resumed), read_header(state_path(resumed)), TrainingError)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(k.startswith("adam.exp_avg_sq.") for k in sa) and "rng.cpu" in sa
    assert straight.read_bytes() == resumed.read_bytes()

    # a resume with a setting that shapes the trajectory changed is refused
    code, _, stderr = cli(
        "--model",
        fixture_models["bert-base"],
        "--index",
        work["index:bert-base"],
        "--data",
        work["cls"],
        "-o",
        resumed,
        "--max-steps",
        9,
        "--batch-size",
        2,
        "--grad-accum",
        2,
        "--max-length",
        32,
        "--lr",
        5e-3,
        "--seed",
        1,
        "--resume",
    )
    assert code == 2 and "cannot resume with lr" in stderr


# ---------------------------------------------------------------- refusals before training


def test_index_from_another_base_is_refused(fixture_models, work, tmp_path):
    other = tmp_path / "llama-other"
    shutil.copytree(fixture_models["llama"], other)
    name = "model.layers.1.self_attn.v_proj.weight"
    shard = other / json.loads((other / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = tensors[name] * 1.01  # same shapes, other values
    save_file(tensors, shard, metadata={"format": "pt"})
    other_index = tmp_path / "other.index.safetensors"
    run_index(other, 4, other_index)

    out = tmp_path / "out" / "x.delta.safetensors"
    out.parent.mkdir()
    code, _, stderr = cli(
        "--model",
        fixture_models["llama"],
        "--index",
        other_index,
        "--data",
        work["text"],
        "-o",
        out,
        "--max-steps",
        2,
        "--max-length",
        32,
    )
    assert code == 2
    assert name in stderr and "fingerprint" in stderr
    assert list(out.parent.iterdir()) == []
    with pytest.raises(FingerprintError, match="v_proj"):
        train(config(fixture_models, {**work, "index:llama": other_index}, "llama", out))


@pytest.mark.parametrize("which", ["data", "eval-data"])
def test_bad_data_line_names_file_and_line_and_writes_nothing(fixture_models, work, tmp_path, which):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a fine line"}\n{"text": "another"}\n{"text": "broken\n', encoding="utf-8")
    out = tmp_path / "out" / "x.delta.safetensors"
    out.parent.mkdir()
    args = ["--data", bad] if which == "data" else ["--data", work["text"], "--eval-data", bad]
    code, _, stderr = cli(
        "--model",
        fixture_models["gpt2"],
        "--index",
        work["index:gpt2"],
        *args,
        "-o",
        out,
        "--max-steps",
        2,
        "--max-length",
        32,
    )
    assert code == 2
    assert "bad.jsonl line 3" in stderr and "invalid JSON" in stderr
    assert list(out.parent.iterdir()) == []


def test_classification_label_errors_and_option_errors(fixture_models, work, tmp_path):
    model, index = fixture_models["bert-base"], work["index:bert-base"]
    bad = write_jsonl(tmp_path / "labels.jsonl", [{"text": "good", "label": 0}, {"text": "bad", "label": 5}])
    out = tmp_path / "x.delta.safetensors"
    code, _, stderr = cli(
        "--model", model, "--index", index, "--data", bad, "-o", out, "--num-labels", 2, "--max-length", 32
    )
    assert code == 2 and "labels.jsonl line 2" in stderr and "outside range(2)" in stderr
    code, _, stderr = cli("--model", model, "--index", index, "--data", work["cls"], "-o", out, "--max-length", 512)
    assert code == 2 and "64 positions" in stderr
    code, _, stderr = cli(
        "--model", model, "--index", index, "--data", work["cls"], "-o", out, "--resume", "--max-length", 32
    )
    assert code == 2 and "no resume state" in stderr
    out.write_bytes(b"")
    code, _, stderr = cli("--model", model, "--index", index, "--data", work["cls"], "-o", out, "--max-length", 32)
    assert code == 2 and "already exists" in stderr
    code, _, stderr = cli(
        "--model",
        model,
        "--index",
        index,
        "--data",
        work["cls"],
        "-o",
        model / "inside.delta.safetensors",
        "--max-length",
        32,
    )
    assert code == 2 and "inside the base model folder" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.jsonl", "x.delta.safetensors"]


# ---------------------------------------------------------------- NaN


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(fixture_models, work, tmp_path, monkeypatch):
    real = steps_mod.compute_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, correct = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] == 5 else loss), correct

    monkeypatch.setattr(steps_mod, "compute_loss", poisoned)
    out = tmp_path / "n.delta.safetensors"
    code, _, stderr = cli(
        "--model",
        fixture_models["gpt2"],
        "--index",
        work["index:gpt2"],
        "--data",
        work["text"],
        "-o",
        out,
        "--max-steps",
        8,
        "--save-every",
        2,
        "--batch-size",
        2,
        "--max-length",
        32,
    )
    assert code == 2
    assert "NaN" in stderr and "step 5" in stderr and "last good checkpoint (step 4)" in stderr
    delta = read_delta(out, read_index(work["index:gpt2"]))  # readable: no NaN in it
    assert delta.info["steps"] == 4
    assert json.loads(read_header(state_path(out)).metadata["neuroada.state"])["step"] == 4
    monkeypatch.setattr(steps_mod, "compute_loss", real)

    # a learning rate that blows up: stopped at step 2, nothing was saved yet, nothing written
    out2 = tmp_path / "blow" / "b.delta.safetensors"
    out2.parent.mkdir()
    with pytest.raises(TrainingError, match="no checkpoint was written"):
        train(config(fixture_models, work, "gpt2", out2, lr=1e30, max_steps=4))
    assert list(out2.parent.iterdir()) == []


# ---------------------------------------------------------------- other tasks and options


def test_multiple_choice_bf16_with_gradient_checkpointing(fixture_models, work, tmp_path):
    record = {
        "instruction": "Please choose the correct answer to the question: What is the capital of France?\n\n"
        "Answer1: Haus Answer2: Paris Answer3: blue\n\nAnswer format: answer1/answer2/answer3",
        "input": "",
        "output": "the correct answer is answer2",
        "answer": "answer2",
    }
    two = dict(
        record,
        instruction="Please choose the correct answer to the question: Which is a colour?\n\n"
        "Answer1: red Answer2: dog\n\nAnswer format: answer1/answer2",
        answer="answer1",
    )
    data = write_jsonl(tmp_path / "arc.jsonl", [record, two] * 2)  # 3 and 2 options: padded choices
    out = tmp_path / "mc.delta.safetensors"
    s = train(
        config(
            fixture_models,
            {**work, "mc": data},
            "bert-base",
            out,
            data="mc",
            task="multiple-choice",
            dtype="bf16",
            gradient_checkpointing=True,
            max_steps=3,
            eval_data=data,
        )
    )
    assert s.task == "multiple-choice" and s.head_parameters == 33 and len(s.losses) == 3
    assert all(torch.isfinite(torch.tensor(s.losses))) and 0.0 <= s.eval["accuracy"] <= 1.0
    delta = read_delta(out, read_index(work["index:bert-base"]))
    assert sorted(delta.dense) == ["classifier.bias", "classifier.weight"] and delta.info["dtype"] == "bf16"
    assert all(t.dtype == torch.float32 and bool(t.abs().sum() > 0) for t in delta.deltas.values())
    state = read_all(state_path(out), read_header(state_path(out)), TrainingError)
    assert all(t.dtype == torch.float32 for k, t in state.items() if k.startswith(("param.", "adam.")))


def test_checkpointing_and_accumulation_give_the_same_deltas(fixture_models, work, tmp_path):
    runs = {
        "plain": dict(batch_size=4),
        "checkpointing": dict(batch_size=4, gradient_checkpointing=True),
        "accumulated": dict(batch_size=2, grad_accum=2),  # the same 4 examples per step, in two halves
    }
    out = {}
    for name, kw in runs.items():
        train(config(fixture_models, work, "llama", tmp_path / f"{name}.delta.safetensors", max_steps=3, **kw))
        out[name] = load_file(tmp_path / f"{name}.delta.safetensors")
    for name in ("checkpointing", "accumulated"):
        assert all(torch.allclose(out["plain"][k], out[name][k], rtol=1e-4, atol=1e-6) for k in out["plain"]), name


def test_instruction_data_prompt_masking_and_train_on_prompt(fixture_models, work, tmp_path, monkeypatch):
    rows = [{"instruction": "What is the capital of France?", "input": "", "output": "Paris."}] * 4
    data = write_jsonl(tmp_path / "inst.jsonl", rows)
    w = {**work, "inst": data}
    out = tmp_path / "i.delta.safetensors"
    # the Alpaca prompt alone is longer than 32 tokens of the tiny tokenizer: nothing left to learn
    with pytest.raises(DataError, match="inst.jsonl: no example keeps a response token"):
        train(config(fixture_models, w, "llama", out, data="inst", max_steps=2))
    s = train(config(fixture_models, w, "llama", out, data="inst", max_steps=2, train_on_prompt=True))
    assert s.steps == 2 and s.target_tokens == 2 * 2 * 31  # every token but the first is a target
    # with a short template the response fits: only its tokens (+ eos) are targets
    monkeypatch.setattr(data_mod.prompts, "PROMPT_TEMPLATE_NO_INPUT", "Q: {instruction}\nA: ")
    s = train(config(fixture_models, w, "llama", out, data="inst", max_steps=2, force=True))
    from transformers import AutoTokenizer

    n_response = len(
        AutoTokenizer.from_pretrained(fixture_models["llama"])("Paris.", add_special_tokens=False).input_ids
    )
    assert s.steps == 2 and s.target_tokens == 2 * 2 * (n_response + 1)


def test_max_length_defaults_to_the_model_positions_when_fewer_than_256(fixture_models, work, tmp_path):
    # the fixtures hold 64 positions: no --max-length trains at 64; an explicit 65 is refused
    out = tmp_path / "m.delta.safetensors"
    s = train(config(fixture_models, work, "llama", out, max_length=None, max_steps=1))
    assert s.steps == 1 and read_delta(out).info["max_length"] == 64
    with pytest.raises(ModelError, match="--max-length 65 is longer than the model's 64 positions"):
        train(config(fixture_models, work, "llama", tmp_path / "n.delta.safetensors", max_length=65))
