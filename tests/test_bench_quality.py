"""`bench/bench_quality.py` on the tiny `bert-base` fixture and a few made-up BoolQ / ARC records.

Exercises the `--quick` path end to end (both tasks, every method family, the lr pick, 3 seeds, the
interleaved timing pass, the markdown) in one child process, the memory probe in process, plus the
pieces the numbers depend on: the question extraction, the matched budgets and the accuracy of
`evaluate` (ARC rows with 3 and 5 options included). No real model or data is needed; well under 30 s on two CPU cores.
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
        out.append(
            {
                "instruction": f"Please answer the following question with true or false, question: {q}\n\n"
                "Answer format: true/false",
                "input": "",
                "output": f"the correct answer is {ans}",
                "answer": ans,
            }
        )
    return out


def _arc_records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        n_opt = 3 if i % 7 == 0 else 5 if i % 11 == 0 else 4
        opts = " ".join(f"Answer{j + 1}: the {WORDS[(i + 2 * j) % len(WORDS)]}" for j in range(n_opt))
        fmt = "/".join(f"answer{j + 1}" for j in range(n_opt))
        ans = f"answer{i % n_opt + 1}"
        out.append(
            {
                "instruction": f"Please choose the correct answer to the question: Which colour is the "
                f"{WORDS[i % len(WORDS)]}?\n\n{opts}\n\nAnswer format: {fmt}",
                "input": "",
                "output": f"the correct answer is {ans}",
                "answer": ans,
            }
        )
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench_data")
    for folder, make, n_train, n_test in (("boolq", _boolq_records, 60, 30), ("arc-easy", _arc_records, 40, 23)):
        (root / folder).mkdir()
        (root / folder / "train.json").write_text(json.dumps(make(n_train)))
        (root / folder / "test.json").write_text(json.dumps(make(n_test)[::-1]))
    return root


def test_boolq_question_strips_the_prompt():
    rec = _boolq_records(1)[0]
    assert bq.boolq_question(rec["instruction"]) == "is the the quick near the sea?"
    assert bq.boolq_question("no boilerplate here") == "no boilerplate here"


def test_matched_budgets_on_the_fixture(fixture_models):
    ctx = bq.Context(fixture_models["bert-base"])
    counts = {}
    for m in bq.methods_for(quick=True):
        if m.k == 4 or m.kind == "head":
            _, params, info = bq.build_method(ctx, "boolq", m, 0)
            counts[m.kind] = info["trainable"] - info["head"]
            assert info["trainable"] == sum(p.numel() for p in params)
    assert counts["head"] == 0
    assert counts["neuroada"] == 4 * ctx.budget.sum_dout
    assert counts["supertuning"] == counts["neuroada"]  # same number of trainable entries
    r = ctx.budget.lora_r(4)
    assert counts["lora"] == r * ctx.budget.sum_din_dout


def test_evaluate_matches_a_plain_loop_with_ragged_options(fixture_models, data_dir):
    ctx = bq.Context(fixture_models["bert-base"])
    s = bq.QUICK["arc"]
    data = bq.load_task("arc", data_dir, ctx.tokenizer, s)
    assert {len(ex["input_ids"]) for ex in data.test} == {3, 4, 5}
    model, _, _ = bq.build_method(ctx, "arc", bq.Method("head", "head"), 0)
    got = bq.evaluate(ctx, model, data.test, "arc", eval_batch=5)
    model.eval()
    right = 0
    with torch.no_grad():
        for ex in data.test:  # each option alone, unpadded: the score does not depend on the others
            scores = []
            for j in range(len(ex["input_ids"])):
                kw = {
                    k: torch.tensor(ex[k][j])[None, None]
                    for k in ("input_ids", "attention_mask", "token_type_ids")
                    if k in ex
                }
                scores.append(float(model(**kw).logits[0, 0]))
            right += max(range(len(scores)), key=scores.__getitem__) == ex["label"]
    assert got["acc"] == pytest.approx(right / len(data.test))


def test_quick_run_end_to_end(fixture_models, data_dir, tmp_path):
    out, js = tmp_path / "table.md", tmp_path / "results.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "bench_quality.py"),
        "--quick",
        "--threads",
        "1",
        "--model",
        str(fixture_models["bert-base"]),
        "--data",
        str(data_dir),
        "--methods",
        "neuroada-k1,lora-k1,supertuning-k1,head,full",
        "--steps",
        "3",
        "--no-memory",
        "--out",
        str(out),
        "--json",
        str(js),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(js.read_text())
    for task in ("boolq", "arc"):
        ms = res["tasks"][task]["methods"]
        assert list(ms) == ["neuroada-k1", "lora-k1", "supertuning-k1", "head", "full"]
        for r in ms.values():
            assert r["lr"] in r["lrs"] and len(r["sweep"]) == 2 and len(r["seeds"]) == 3
            assert all(0.0 <= x["test_acc"] <= 1.0 for x in r["seeds"])
            assert r["step_ms"] > 0
        assert set(res["tasks"][task]["timing_ms"]) == set(ms)  # the interleaved step-time pass
        assert all("memory" not in r for r in ms.values())  # --no-memory
    md = out.read_text()
    assert "### BoolQ" in md and "### ARC-Easy" in md and "| neuroada-k1 |" in md


def test_memory_probe_counts_optimizer_state(fixture_models, data_dir):
    ctx = bq.Context(fixture_models["bert-base"])
    s = bq.QUICK["boolq"]
    data = bq.load_task("boolq", data_dir, ctx.tokenizer, s, with_test=False)
    methods = {m.name: m for m in bq.methods_for(quick=True)}
    got = bq.memory_probe(ctx, data, "boolq", methods["neuroada-k1"], s, 1e-3)
    assert got["peak_delta_mib"] >= 0 and got["batch_shape"][0] == s.batch
