"""`index --criterion gradient`: equals a brute-force autograd reference, records its calibration,
refuses bad data before loading a model, refuses misplaced options, is deterministic, and trains.

Every run is tiny (12 records, max length 32) so the file stays around a minute on two cores.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from neuroada_tools.cli import main
from neuroada_tools.hf import task_config
from neuroada_tools.index import gradient as gradient_mod
from neuroada_tools.index.criteria import reference_select, select
from neuroada_tools.index.targets import resolve_targets
from neuroada_tools.io.checkpoint import open_checkpoint
from neuroada_tools.io.sidecar import fingerprint, read_delta, read_index
from neuroada_tools.train.data import collate
from neuroada_tools.train.setup import DataSettings, prepare_data
from neuroada_tools.train.steps import compute_loss

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
EXAMPLES, BATCH, MAX_LENGTH, K = 7, 3, 32, 4  # 7 of the 12 records: batches of 3, 3 and 1
CALIBRATION = ["--calibration-examples", EXAMPLES, "--batch-size", BATCH, "--max-length", MAX_LENGTH]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gradient-data")
    return {
        "text": write_jsonl(d / "text.jsonl", [{"text": f"{t} ({i})"} for i, t in enumerate(TEXTS * 3)]),
        "cls": write_jsonl(d / "cls.jsonl", [{"text": t, "label": y} for t, y in REVIEWS * 3]),
    }


def cli(*args) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def gradient_index(model: Path, data: Path, out: Path, *extra) -> dict:
    code, stdout, stderr = cli("index", model, "-k", K, "--criterion", "gradient", "--data", data, *CALIBRATION,
                               "--device", "cpu", "--json", "-q", "-o", out, *extra)
    assert code == 0, stderr
    return json.loads(stdout)


def one_line(code: int, stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, stderr)
    return lines[0]


def brute_force_index(model_dir: Path, data: Path, task: str) -> dict[str, torch.Tensor]:
    """The same batches through plain autograd: every parameter trainable, ``W.grad`` cleared per
    batch and ``|W.grad|`` summed; then per-row top-k with ties to the lower column."""
    import transformers

    prep = prepare_data(DataSettings(data=data, max_length=MAX_LENGTH), task, model_dir)
    cls = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModelForSequenceClassification
    cfg = task_config(model_dir, task, label_names=prep.label_names)
    model = cls.from_pretrained(str(model_dir), config=cfg, dtype=torch.float32, local_files_only=True)
    model.eval()
    ckpt = open_checkpoint(model_dir)
    targets = resolve_targets(ckpt, (), ())
    params = dict(model.named_parameters())
    prefix = "" if targets[0].name in params else model.base_model_prefix + "."
    score = {t.name: torch.zeros_like(params[prefix + t.name]) for t in targets}
    examples = prep.examples[:EXAMPLES]
    for s in range(0, len(examples), BATCH):
        model.zero_grad(set_to_none=True)
        loss, _ = compute_loss(model, collate(examples[s : s + BATCH], prep.pad_id), task, torch.device("cpu"))
        loss.backward()
        for t in targets:
            score[t.name] += params[prefix + t.name].grad.abs()
    return {t.name: reference_select(score[t.name].t() if t.transposed else score[t.name], K) for t in targets}


@pytest.mark.parametrize("arch, kind, task", [("llama", "text", "causal-lm"), ("gpt2", "text", "causal-lm"),
                                              ("bert-cls", "cls", "classification")])
def test_equals_brute_force_autograd_reference(fixture_models, data, tmp_path, arch, kind, task):
    out = tmp_path / "g.index.safetensors"
    gradient_index(fixture_models[arch], data[kind], out)
    index = read_index(out)
    expected = brute_force_index(fixture_models[arch], data[kind], task)
    assert sorted(index.indices) == sorted(expected)
    ckpt = open_checkpoint(fixture_models[arch])
    differs_from_magnitude = False
    for name, want in expected.items():
        assert torch.equal(index.indices[name], want), name
        stored = ckpt.read(name)
        logical = stored.t() if index.entries[name].transposed else stored
        assert index.entries[name].fingerprint == fingerprint(logical, want), name  # the base's, as magnitude
        differs_from_magnitude |= not torch.equal(want, select(logical, K))
    assert differs_from_magnitude  # the scores, not the weights, chose


def test_metadata_records_criterion_and_calibration(fixture_models, data, tmp_path):
    out = tmp_path / "g.index.safetensors"
    summary = gradient_index(fixture_models["llama"], data["text"], out)
    sha = hashlib.sha256(data["text"].read_bytes()).hexdigest()
    recorded = {"batch_size": BATCH, "data_sha256": sha, "examples": EXAMPLES, "max_length": MAX_LENGTH,
                "task": "causal-lm"}
    index = read_index(out)
    assert index.criterion == "gradient" and index.seed is None and index.calibration == recorded
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["neuroada.criterion"] == "gradient"
    assert json.loads(meta["neuroada.calibration"]) == recorded
    assert summary["criterion"] == "gradient" and summary["sha256"] == index.digest
    assert {k: summary["calibration"][k] for k in recorded} == recorded
    assert summary["calibration"]["device"] == "cpu" and summary["calibration"]["target_count"] > 0
    # more examples asked for than the file has: all 12 are used, and the sidecar says so; no
    # --max-length: train-sparse's default, min(256, the model's 64 positions)
    code, _, stderr = cli("index", fixture_models["llama"], "-k", K, "--criterion", "gradient", "--data", data["text"],
                          "--calibration-examples", 1000, "--device", "cpu", "-q", "--force", "-o", out)
    assert code == 0, stderr
    assert read_index(out).calibration == {**recorded, "examples": 12, "max_length": 64, "batch_size": 8}
    # magnitude sidecars are unchanged: no calibration key
    plain = tmp_path / "m.index.safetensors"
    assert cli("index", fixture_models["llama"], "-k", K, "-q", "-o", plain)[0] == 0
    with safe_open(str(plain), "pt") as f:
        assert "neuroada.calibration" not in f.metadata()


def test_bad_data_line_is_one_line_error_before_any_model_is_loaded(fixture_models, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        pytest.fail("a model was loaded before the data was checked")

    monkeypatch.setattr(gradient_mod, "load_model", no_loading)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a fine line"}\n{"text": "another"}\n{"text": "broken\n', encoding="utf-8")
    out = tmp_path / "out" / "g.index.safetensors"
    out.parent.mkdir()
    code, _, stderr = cli("index", fixture_models["llama"], "-k", K, "--criterion", "gradient", "--data", bad,
                          "--max-length", MAX_LENGTH, "-o", out)
    line = one_line(code, stderr)
    assert f"error: {bad} line 3: invalid JSON" in line, line
    # a record of the wrong shape: also named by line, also before loading
    bad.write_text('{"text": "a fine line"}\n{"label": 1}\n', encoding="utf-8")
    line = one_line(*cli("index", fixture_models["llama"], "-k", K, "--criterion", "gradient", "--data", bad,
                         "--max-length", MAX_LENGTH, "-o", out)[::2])
    assert f"{bad} line 2" in line, line
    assert list(out.parent.iterdir()) == []


def test_data_options_only_with_gradient_and_gradient_needs_data(fixture_models, data, tmp_path):
    out = tmp_path / "g.index.safetensors"
    code, _, stderr = cli("index", fixture_models["llama"], "-k", K, "--criterion", "gradient", "-o", out)
    assert one_line(code, stderr) == "error: --criterion gradient needs --data FILE (the calibration examples)"
    for criterion, option in [("magnitude", ["--data", data["text"]]), ("random", ["--batch-size", 2]),
                              ("smallest", ["--calibration-examples", 5]), ("magnitude", ["--task", "causal-lm"])]:
        code, _, stderr = cli("index", fixture_models["llama"], "-k", K, "--criterion", criterion, *option, "-o", out)
        assert one_line(code, stderr) == (
            f"error: {option[0]} only applies to --criterion gradient (the {criterion} criterion uses no data)"
        )
    code, _, stderr = cli("index", fixture_models["llama"], "-k", K, "--criterion", "gradient", "--data",
                          data["text"], "--max-length", 65, "-o", out)
    assert "--max-length 65 is longer than the model's 64 positions" in one_line(code, stderr)
    shard = fixture_models["llama"] / "model-00001-of-00004.safetensors"  # not what transformers loads
    code, _, stderr = cli("index", shard, "-k", K, "--criterion", "gradient", "--data", data["text"], "-o", out)
    assert one_line(code, stderr) == (
        f"error: {shard}: is not the checkpoint transformers loads from {shard.parent}; give the model folder instead"
    )
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes((fixture_models["bert-cls"] / "model.safetensors").read_bytes())
    code, _, stderr = cli("index", bare, "-k", K, "--criterion", "gradient", "--data", data["cls"], "-o", out)
    assert one_line(code, stderr) == (
        f"error: {bare}: --criterion gradient loads the model with transformers and needs its folder "
        "(config.json, weights, tokenizer); no config.json there"
    )
    assert not out.exists()
    single = fixture_models["bert-cls"] / "model.safetensors"  # a file is fine where it is the folder's checkpoint
    assert cli("index", single, "-k", K, "--criterion", "gradient", "--data", data["cls"], *CALIBRATION, "-q",
               "-o", out)[0] == 0


def test_deterministic_byte_identical_and_leaves_the_global_rng_alone(fixture_models, data, tmp_path):
    # bert-base has no head: a fresh one is drawn from seed 0 whatever the caller's random state
    a, b = tmp_path / "a.index.safetensors", tmp_path / "b.index.safetensors"
    torch.manual_seed(1)
    state = torch.random.get_rng_state()
    gradient_index(fixture_models["bert-base"], data["cls"], a)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(2)
    gradient_index(fixture_models["bert-base"], data["cls"], b)
    assert a.read_bytes() == b.read_bytes()
    # llama, once in this process and once in a fresh one
    c, d = tmp_path / "c.index.safetensors", tmp_path / "d.index.safetensors"
    gradient_index(fixture_models["llama"], data["text"], c)
    subprocess.run([sys.executable, "-m", "neuroada_tools", "index", str(fixture_models["llama"]), "-k", str(K),
                    "--criterion", "gradient", "--data", str(data["text"]), *map(str, CALIBRATION),
                    "--device", "cpu", "-q", "-o", str(d)], check=True, capture_output=True)
    assert c.read_bytes() == d.read_bytes()


def test_train_sparse_accepts_the_sidecar(fixture_models, data, tmp_path):
    index = tmp_path / "g.index.safetensors"
    gradient_index(fixture_models["llama"], data["text"], index)
    out = tmp_path / "g.delta.safetensors"
    code, stdout, stderr = cli("train-sparse", "--model", fixture_models["llama"], "--index", index, "--data",
                               data["text"], "--max-steps", 2, "--batch-size", 2, "--max-length", MAX_LENGTH,
                               "--lr", 1e-2, "--device", "cpu", "--json", "-q", "-o", out)
    assert code == 0, stderr
    assert json.loads(stdout)["steps"] == 2
    delta = read_delta(out, read_index(index))
    assert any(bool(t.abs().sum() > 0) for t in delta.deltas.values())


def test_hooks_hold_one_gradient_at_a_time_and_freeze_the_rest(fixture_models, data, monkeypatch):
    """The memory bound: when a weight's hook runs, no other adapted weight holds a gradient, and
    no other parameter gets one at all."""
    import transformers

    model_dir = fixture_models["llama"]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    targets = resolve_targets(open_checkpoint(model_dir), (), ())
    params = {t.name: dict(model.named_parameters())[t.name] for t in targets}
    live: list[int] = []
    real = gradient_mod._accumulate_into

    def counting(acc):
        hook = real(acc)

        def wrapped(p):
            live.append(sum(q.grad is not None for q in model.parameters()))
            hook(p)

        return wrapped

    monkeypatch.setattr(gradient_mod, "_accumulate_into", counting)
    prep = prepare_data(DataSettings(data=data["text"], max_length=MAX_LENGTH), "causal-lm", model_dir)
    batches = list(gradient_mod.calibration_batches(prep.examples[:4], 2, prep.pad_id))
    result = gradient_mod.gradient_scores(model, params, batches, "causal-lm", torch.device("cpu"))
    assert live and set(live) == {1} and len(live) == len(params) * len(batches)
    assert all(p.grad is None for p in model.parameters())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(params)
    assert result.batches == 2 and set(result.scores) == set(params)


def test_worked_example_sum_of_absolute_gradients():
    """The module docstring's example: |g1| + |g2|, then per-row top-k with ties to the lower column."""
    p = torch.nn.Parameter(torch.zeros(2, 3))
    acc = torch.zeros(2, 3)
    hook = gradient_mod._accumulate_into(acc)
    for g in ([[1.0, -2.0, 0.0], [0.0, 0.0, 3.0]], [[-1.0, 1.0, 4.0], [2.0, 0.0, -3.0]]):
        p.grad = torch.tensor(g)
        hook(p)
        assert p.grad is None
    assert torch.equal(acc, torch.tensor([[2.0, 3.0, 4.0], [2.0, 0.0, 6.0]]))
    assert select(acc, 1).tolist() == [[2], [2]]
    assert select(acc, 2).tolist() == [[1, 2], [0, 2]]
    assert select(torch.tensor([[1.0, 3.0, 3.0, 0.0]]), 1).tolist() == [[1]]  # a tie: the lower column
