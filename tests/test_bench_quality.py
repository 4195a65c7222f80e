"""`bench/bench_quality.py` on the tiny `bert-base` fixture and a few made-up BoolQ / ARC records.

What the numbers of the converged protocol depend on: the JSONL results file (a finished run is
skipped, a missing one is run again), the pairing of seeds (same batch order and head initialisation
for every method of a seed), the paired-difference t-interval on a worked example, the gradient and
random criteria's indices, the matched budgets, the accuracy of `evaluate` (ARC rows with 3 and 5
options), and the `--quick` path end to end through the worker processes and the report. No real model
or data is needed; under a minute on two CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "bench_quality.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_quality", mod)
    spec.loader.exec_module(mod)
    return mod


bq = _load_bench()

WORDS = ["the", "quick", "brown", "fox", "town", "sea", "paris", "france", "music", "red", "blue", "green"]


def _boolq_records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        q = f"is the {WORDS[i % len(WORDS)]} {WORDS[(3 * i + 1) % len(WORDS)]} near the sea?"
        ans = "true" if i % 3 else "false"
        out.append({"instruction": f"Please answer the following question with true or false, question: {q}\n\n"
                    "Answer format: true/false", "input": "", "output": f"the correct answer is {ans}", "answer": ans})
    return out


def _arc_records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        n_opt = 3 if i % 7 == 0 else 5 if i % 11 == 0 else 4
        opts = " ".join(f"Answer{j + 1}: the {WORDS[(i + 2 * j) % len(WORDS)]}" for j in range(n_opt))
        fmt = "/".join(f"answer{j + 1}" for j in range(n_opt))
        ans = f"answer{i % n_opt + 1}"
        out.append({"instruction": f"Please choose the correct answer to the question: Which colour is the "
                    f"{WORDS[i % len(WORDS)]}?\n\n{opts}\n\nAnswer format: {fmt}", "input": "",
                    "output": f"the correct answer is {ans}", "answer": ans})
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench_data")
    for folder, make, n_train, n_test in (("boolq", _boolq_records, 60, 30), ("arc-easy", _arc_records, 40, 23)):
        (root / folder).mkdir()
        (root / folder / "train.json").write_text(json.dumps(make(n_train)))
        (root / folder / "test.json").write_text(json.dumps(make(n_test)[::-1]))
    return root


@pytest.fixture()
def keep_threads():
    """`main` sets torch's thread count for its process; put it back for the other tests."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ctx(fixture_models):
    return bq.Context(fixture_models["bert-base"])


def _args(fixture_models, data_dir, results: Path, *extra: str) -> list[str]:
    return ["--quick", "--workers", "1", "--threads", "1", "--model", str(fixture_models["bert-base"]),
            "--data", str(data_dir), "--results", str(results), "--timing-reps", "0", "--steps", "2", *extra]


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_boolq_question_strips_the_prompt():
    rec = _boolq_records(1)[0]
    assert bq.boolq_question(rec["instruction"]) == "is the the quick near the sea?"
    assert bq.boolq_question("no boilerplate here") == "no boilerplate here"


def test_paired_interval_worked_example():
    # the worked example of quality/stats.py: d = 0.02, 0.04, 0.03 over 3 seeds
    got = bq.paired_interval({0: 0.52, 1: 0.54, 2: 0.53, 5: 0.9}, {0: 0.50, 1: 0.50, 2: 0.50})
    assert got["seeds"] == [0, 1, 2] and got["df"] == 2  # seed 5 has no partner: left out
    assert got["mean"] == pytest.approx(0.03) and got["sd"] == pytest.approx(0.01)
    assert got["t"] == pytest.approx(4.302653, abs=1e-5)
    assert got["half"] == pytest.approx(4.302653 * 0.01 / 3 ** 0.5, abs=1e-7)
    assert (got["lo"], got["hi"]) == (pytest.approx(0.0051586, abs=1e-6), pytest.approx(0.0548414, abs=1e-6))
    for df, t in ((1, 12.7062), (4, 2.7764), (10, 2.2281), (30, 2.0423)):  # tables of Student's t, 97.5%
        assert bq.t_quantile(0.975, df) == pytest.approx(t, abs=1e-4)
    assert bq.paired_interval({0: 0.5}, {0: 0.4}) is None  # one pair: no interval


def test_gradient_and_random_criteria_give_indices_of_the_right_shape(ctx, data_dir):
    data = bq.load_task("arc", data_dir, ctx.tokenizer, bq.QUICK["arc"])
    ctx.calibration["arc"] = bq.Calibration("arc", tuple(data.calibration), 64, 4)
    mag = ctx.index(4)
    grad = ctx.index(4, "gradient", task="arc")
    rand0, rand1 = ctx.index(4, "random", seed=0), ctx.index(4, "random", seed=1)
    assert grad.criterion == "gradient" and grad.calibration["examples"] == len(data.calibration) == 16
    for idx in (grad, rand0, rand1):
        assert sorted(idx.indices) == sorted(mag.indices)
        for name, t in idx.indices.items():
            d_out, d_in = idx.entries[name].shape
            assert tuple(t.shape) == (d_out, 4) and t.dtype == torch.int32
            assert int(t.min()) >= 0 and int(t.max()) < d_in
            assert bool((t[:, 1:] > t[:, :-1]).all())  # rows strictly ascending: 4 distinct inputs
    assert any(not torch.equal(grad.indices[n], mag.indices[n]) for n in mag.indices)
    assert any(not torch.equal(rand0.indices[n], rand1.indices[n]) for n in mag.indices)
    assert ctx.index(4, "random", seed=0) is rand0  # cached: the same draw for every run of a seed


def test_paired_seeds_share_batches_and_head_across_methods(ctx, data_dir):
    data = bq.load_task("arc", data_dir, ctx.tokenizer, bq.QUICK["arc"])
    ctx.calibration["arc"] = bq.Calibration("arc", tuple(data.calibration), 64, 4)
    main, _ = bq.methods_for(quick=True)
    heads, orders = {}, {}
    for m in main:
        for seed in (0, 1):
            model, params, info = bq.build_method(ctx, "arc", m, seed)
            heads[m.name, seed] = [p.detach().clone() for n, p in model.named_parameters() if "classifier" in n]
            assert info["head_sha"] == bq.build_method(ctx, "arc", main[-1], seed)[2]["head_sha"]
            orders[m.name, seed] = bq.train_run(ctx, model, params, data, "arc", 2, 4, 1e-3, seed)["batches_sha"]
    for m in main:
        for seed in (0, 1):
            assert all(torch.equal(a, b) for a, b in zip(heads[m.name, seed], heads[main[0].name, seed]))
            assert orders[m.name, seed] == orders[main[0].name, seed]
    assert not torch.equal(heads[main[0].name, 0][0], heads[main[0].name, 1][0])
    assert orders[main[0].name, 0] != orders[main[0].name, 1]
    b0 = bq.train_batches(data.train, 4, 2 * bq.steps_per_epoch(len(data.train), 4), 0)
    assert len(b0) == 2 * bq.steps_per_epoch(len(data.train), 4) and all(len(b) == 4 for b in b0)


def test_results_file_resumes_and_skips_finished_runs(fixture_models, data_dir, tmp_path, keep_threads, capsys):
    results = tmp_path / "runs.jsonl"
    args = _args(fixture_models, data_dir, results, "--methods", "neuroada-k4-magnitude,head", "--seeds", "2")
    assert bq.main(args) == 0
    recs = _lines(results)
    runs = [r for r in recs if r["phase"] in ("sweep", "test")]
    # per method: 2 sweep lrs (seed 0) + 2 test seeds
    assert len(runs) == 8 and sum(r["phase"] == "protocol" for r in recs) == 1
    for r in runs:
        for key in ("method", "seed", "lr", "val_acc", "steps", "train_s", "step_ms", "peak_mib", "batches_sha",
                    "head_sha"):
            assert key in r, key
        assert r["steps"] == 2
    tests = [r for r in runs if r["phase"] == "test"]
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in tests)
    assert sum(bool(r.get("reused_sweep")) for r in tests) == 2  # seed 0 of each method: the sweep's model
    for seed in (0, 1):  # the pairing, as recorded
        assert len({(r["batches_sha"], r["head_sha"]) for r in tests if r["seed"] == seed}) == 1
    capsys.readouterr()

    assert bq.main(args) == 0  # everything is there: nothing is trained again
    assert len(_lines(results)) == len(recs)
    out = capsys.readouterr().out
    assert out.count("skipped") == 8 and "| neuroada-k4-magnitude |" in out and "| head |" in out

    lost = next(r for r in tests if r["method"] == "head" and r["seed"] == 1)  # as if killed before that run
    results.write_text("".join(json.dumps(r) + "\n" for r in recs if r is not lost) + '{"v": 1, "cut')
    assert bq.main(args) == 0
    lines = results.read_text().splitlines()
    new = json.loads(lines[-1])
    assert len(lines) == len(recs) + 1  # the cut line stays, unread; the lost run is back
    assert (new["method"], new["phase"], new["seed"], new["lr"]) == ("head", "test", 1, lost["lr"])
    assert new["batches_sha"] == lost["batches_sha"] and new["head_sha"] == lost["head_sha"]
    assert "1 unreadable lines" in capsys.readouterr().out


def test_quick_without_a_results_file_reports_from_memory(fixture_models, data_dir, keep_threads, capsys):
    args = ["--quick", "--workers", "1", "--model", str(fixture_models["bert-base"]), "--data", str(data_dir),
            "--methods", "head", "--steps", "2", "--timing-reps", "0"]
    assert bq.main(args) == 0
    out = capsys.readouterr().out
    assert "results (in memory)" in out and "| head |" in out and "(2) |" in out  # --quick: 2 seeds


def test_render_reports_paired_differences(fixture_models, data_dir, tmp_path, keep_threads, capsys):
    results = tmp_path / "runs.jsonl"
    args = _args(fixture_models, data_dir, results, "--methods", "neuroada-k4-magnitude,lora-k4", "--seeds", "3")
    assert bq.main(args) == 0
    capsys.readouterr()
    assert bq.main(["--render", "--results", str(results), "--out", str(tmp_path / "t.md")]) == 0
    md = (tmp_path / "t.md").read_text()
    assert "| lora-k4, r=" in md and "(reference)" in md and "(n=3)" in md and "t = 4.303" in md
    assert "same batch order and started from the same head" in md


def test_quick_run_through_workers_and_estimate(fixture_models, data_dir, tmp_path):
    out, results = tmp_path / "table.md", tmp_path / "runs.jsonl"
    base = [sys.executable, str(ROOT / "bench" / "bench_quality.py"), "--quick", "--model",
            str(fixture_models["bert-base"]), "--data", str(data_dir), "--steps", "3"]
    methods = "neuroada-k4-magnitude,neuroada-k4-gradient,neuroada-k4-random,lora-k4,supertuning-k4,full,head"
    p = subprocess.run([*base, "--tasks", "arc,boolq", "--methods", methods, "--workers", "2", "--out", str(out),
                        "--results", str(results)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = _lines(results)
    for task in ("arc", "boolq"):
        tests = [r for r in recs if r["task"] == task and r["phase"] == "test"]
        assert sorted({r["method"] for r in tests}) == sorted(methods.split(","))
        assert len(tests) == 7 * 2  # --quick: 2 seeds
        assert {r["workers"] for r in tests} == {2}
        timing = [r for r in recs if r["task"] == task and r["phase"] == "timing"]
        assert len(timing) == 1 and set(timing[0]["step_ms"]) == set(methods.split(","))
    md = out.read_text()
    assert "### ARC-Easy" in md and "### BoolQ" in md and "| neuroada-k4-gradient |" in md
    p = subprocess.run([*base, "--estimate", "--workers", "1", "--estimate-steps", "2", "--methods",
                        "neuroada-k4-magnitude,neuroada-k1-magnitude", "--results", str(results)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "**Projected total:" in p.stdout
    runs = sum(1 for r in recs if r["task"] == "arc" and r["method"] == "neuroada-k4-magnitude" and "train_s" in r)
    assert f"| neuroada-k4-magnitude | 3 (+1) | {runs} runs |" in p.stdout  # projected from the finished runs
    assert "| neuroada-k1-magnitude | 3 (+1) | 2 steps |" in p.stdout  # none finished: timed now


def test_lrs_replaces_the_grid_and_bad_values_are_refused(fixture_models, data_dir, tmp_path, keep_threads, capsys):
    results = tmp_path / "runs.jsonl"
    args = _args(fixture_models, data_dir, results, "--methods", "head", "--seeds", "1", "--lrs", "3e-2,1e-4")
    assert bq.main(args) == 0
    sweep = sorted(r["lr"] for r in _lines(results) if r["phase"] == "sweep")
    assert sweep == [1e-4, 3e-2]  # the given grid (a 2-point grid gets no extension)
    for bad, said in (("0.1,x", "not a comma list of numbers"), ("0,1e-3", "one or more positive")):
        with pytest.raises(SystemExit) as e:
            bq.main(_args(fixture_models, data_dir, results, "--lrs", bad))
        assert e.value.code == 2 and said in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # never into the protocol's own results file
        bq.main(["--lrs", "1e-3", "--model", str(fixture_models["bert-base"]), "--data", str(data_dir)])
    assert e.value.code == 2 and "give the experiment its own --results" in capsys.readouterr().err


def test_projection_from_finished_runs_uses_only_comparable_ones():
    cfg = {"task": "arc", "model": "m1", "batch": 16, "max_length": 128, "eval_batch": 8, "device": "cpu",
           "val": 100, "test": 1000}
    recs = [{"phase": "protocol", "protocol": "p2", "settings": {**cfg, "epochs": 2}},
            {"phase": "protocol", "protocol": "pb", "settings": {**cfg, "batch": 8}}]

    def run(protocol, phase, train_s, steps=252, threads=1, **kw):
        recs.append({"protocol": protocol, "phase": phase, "method": "neuroada-k4-magnitude", "threads": threads,
                     "steps": steps, "train_s": train_s, "build_s": 0.5, "val_s": 20.0, **kw})

    run("p2", "sweep", 530.0)
    run("p2", "test", 480.0, test_s=200.0)  # 1.905 s per step: the least of the comparable runs
    run("p2", "sweep", 100.0, diverged=True)  # stopped early: not a step cost
    run("p2", "sweep", 100.0, threads=2)  # another thread count
    run("pb", "sweep", 100.0)  # another batch size
    m = bq.Method("neuroada-k4-magnitude", "neuroada", 4, (2e-3, 6e-3, 2e-2))
    one_epoch = {**cfg, "epochs": 1}
    rows = bq.from_runs(recs, one_epoch, [m, bq.Method("head", "head")], [0, 1, 2], 1, n_val=50, n_test=2000)
    assert set(rows) == {"neuroada-k4-magnitude"}  # head has no runs: it is timed instead
    r = rows[m.name]
    assert r["step_s"] == pytest.approx(480.0 / 252) and r["from"] == "2 runs"
    assert r["val_s"] == pytest.approx(10.0) and r["test_s"] == pytest.approx(400.0)  # per example x new sizes
    assert r["runs"] == 5 and r["fixed_s"] == pytest.approx(5 * (0.5 + 10.0) + 3 * 400.0)
    est = bq.project([r], "arc", 126, 126, 0, 1)
    assert est["total_s"] == pytest.approx(r["fixed_s"] + 5 * 126 * 480.0 / 252)


def test_makespan_and_lr_extension():
    assert bq.makespan([3, 1, 1, 1], 2) == 3 and bq.makespan([1, 1, 1], 1) == 3
    sweep = {lr: {"val_acc": acc, "val_loss": 1.0} for lr, acc in ((1e-3, 0.3), (3e-3, 0.4), (1e-2, 0.5))}
    assert bq.extension((1e-3, 3e-3, 1e-2), sweep) == pytest.approx(1e-2 * 1e-2 / 3e-3)
    sweep[1e-2]["diverged"] = True  # a diverged run is never the pick
    assert bq.best(sweep) == 3e-3 and bq.extension((1e-3, 3e-3, 1e-2), sweep) is None


def test_matched_budgets_on_the_fixture(ctx):
    counts = {}
    main, _ = bq.methods_for(quick=True)
    for m in main:
        if m.kind in ("neuroada", "lora", "supertuning", "head") and m.criterion == "magnitude":
            _, params, info = bq.build_method(ctx, "boolq", m, 0)
            counts[m.kind] = info["trainable"] - info["head"]
            assert info["trainable"] == sum(p.numel() for p in params)
    assert counts["head"] == 0
    assert counts["neuroada"] == 4 * ctx.budget.sum_dout
    assert counts["supertuning"] == counts["neuroada"]  # same number of trainable entries
    assert counts["lora"] == ctx.budget.lora_r(4) * ctx.budget.sum_din_dout


def test_evaluate_matches_a_plain_loop_with_ragged_options(ctx, data_dir):
    data = bq.load_task("arc", data_dir, ctx.tokenizer, bq.QUICK["arc"])
    assert {len(ex["input_ids"]) for ex in data.test} == {3, 4, 5}
    model, _, _ = bq.build_method(ctx, "arc", bq.Method("head", "head"), 0)
    got = bq.evaluate(ctx, model, data.test, "arc", eval_batch=5)
    model.eval()
    right = 0
    with torch.no_grad():
        for ex in data.test:  # each option alone, unpadded: the score does not depend on the others
            scores = []
            for j in range(len(ex["input_ids"])):
                kw = {k: torch.tensor(ex[k][j])[None, None] for k in ("input_ids", "attention_mask", "token_type_ids")
                      if k in ex}
                scores.append(float(model(**kw).logits[0, 0]))
            right += max(range(len(scores)), key=scores.__getitem__) == ex["label"]
    assert got["acc"] == pytest.approx(right / len(data.test))
