"""The quality benchmark's LLM task (``bench/quality/llm.py``, ``--tasks arc-llm``) on SmolLM2-135M-Instruct
and real ARC-Easy records: what it trains on is what ``evaluate`` scores, its scores are ``evaluate``'s and an
independent per-option computation's, the matched counts, and a short run end to end through the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from neuroada_tools.cli import main
from tests.evalkit import sequence_logprob
from tests.llmkit import smollm2_dir  # noqa: F401  (fixture)
from tests.test_bench_quality import bq

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llm_ctx(smollm2_dir):  # noqa: F811
    return bq.Context(smollm2_dir)


@pytest.fixture(scope="module")
def arc(llm_ctx, data_dir):
    return bq.load_task("arc-llm", data_dir, llm_ctx.tokenizer, bq.QUICK["arc-llm"])


def test_training_tokens_are_the_scored_tokens(llm_ctx, arc, data_dir):
    """Each training example is ``context + right option + eos`` with the loss on the option and eos only,
    and the context and option ids are exactly those the log-likelihood scoring reads."""
    from quality import llm

    items = llm.load_items(data_dir / "arc-easy" / "train.json")[: len(arc.train)]
    pairs = llm.option_pairs(items, llm_ctx.tokenizer, len(llm_ctx.tokenizer))
    eos = llm_ctx.tokenizer.eos_token_id
    for ex, it, ps in zip(arc.train, items, pairs, strict=True):
        ctx, cont = ps[it.gold]
        assert ex["input_ids"] == ctx + cont + [eos]
        assert ex["labels"] == [-100] * len(ctx) + cont + [eos]
    assert arc.note["continuation_mismatches"] == 0


def test_matched_counts_on_smollm2(llm_ctx):
    """The counts the docs state: NeuroAda k=1 / k=20 and LoRA r=1 / r=10 over the 210 q..down matrices."""
    b = llm_ctx.budget
    assert b.n_targets == 210 and b.sum_dout == 155_520 and b.sum_din_dout == 305_280
    assert (b.lora_r(1), b.lora_r(20)) == (1, 10)
    got = {}
    for name in ("neuroada-k1-magnitude", "neuroada-k20-magnitude", "lora-k1", "lora-k20"):
        m = next(m for m in bq.methods_for(True, "arc-llm")[0] if m.name == name)
        model, params, info = bq.build_method(llm_ctx, "arc-llm", m, 0)
        got[name] = info["trainable"]
        del model, params
    assert got == {"neuroada-k1-magnitude": 155_520, "neuroada-k20-magnitude": 3_110_400,
                   "lora-k1": 305_280, "lora-k20": 3_052_800}


def test_scores_are_evaluates_and_an_independent_computation(llm_ctx, arc, smollm2_dir, data_dir, tmp_path):  # noqa: F811
    """The benchmark's zero-shot score of 6 test questions equals ``neuroada-tools evaluate --scoring loglik
    --prompt-style lm-eval`` on the same records, and each option's log-prob equals an unpadded forward."""
    from quality import llm

    m = next(m for m in bq.methods_for(True, "arc-llm")[0] if m.kind == "zero-shot")
    model, _, _ = bq.build_method(llm_ctx, "arc-llm", m, 0)
    split = arc.test[:6]
    got = llm.score(model, split, llm_ctx.pad_id, 8)
    records = json.loads((data_dir / "arc-easy" / "test.json").read_text())
    by_q = {it.question: i for i, it in enumerate(llm.load_items(data_dir / "arc-easy" / "test.json"))}
    path = tmp_path / "six.json"
    path.write_text(json.dumps([records[by_q[it.question]] for it in split.items]))
    pred = tmp_path / "p.jsonl"
    r = CliRunner().invoke(main, ["evaluate", "--model", str(smollm2_dir), "--data", str(path), "--scoring", "loglik",
                                  "--prompt-style", "lm-eval", "--predictions", str(pred), "--json", "-q"])
    assert r.exit_code == 0, r.output
    cli = json.loads(r.stdout)
    assert (got["acc"], got["acc_norm"]) == (cli["acc"], cli["acc_norm"])
    rows = [json.loads(x) for x in pred.read_text().splitlines()]
    with torch.no_grad():
        for (it, ps), row in zip(split, rows, strict=True):
            expected = [sequence_logprob(model, c, o) for c, o in ps]
            assert row["option_logprob"] == pytest.approx(expected, abs=1e-3), it.where
    nll = -sum(row["option_logprob"][row["gold"]] for row in rows) / len(rows)
    assert got["loss"] == pytest.approx(nll, abs=1e-3)


def test_a_short_run_end_to_end(smollm2_dir, data_dir, tmp_path):  # noqa: F811
    """Zero-shot, NeuroAda k=20 and LoRA r=10 for 3 steps: records with both accuracies, the report's rows."""
    results = tmp_path / "runs.jsonl"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_quality.py"), "--tasks", "arc-llm", "--quick", "--workers",
           "1", "--seeds", "1", "--timing-reps", "0", "--model", str(smollm2_dir), "--data", str(data_dir),
           "--methods", "zero-shot,neuroada-k20-magnitude,lora-k20", "--results", str(results)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    recs = [json.loads(x) for x in results.read_text().splitlines()]
    tests = {r["method"]: r for r in recs if r["phase"] == "test"}
    assert set(tests) == {"zero-shot", "neuroada-k20-magnitude", "lora-k20"}
    for r in tests.values():
        assert 0 <= r["test_acc"] <= 1 and 0 <= r["test_acc_norm"] <= 1
    assert tests["zero-shot"]["steps"] == 0 and tests["neuroada-k20-magnitude"]["steps"] == 3
    assert tests["lora-k20"]["r"] == 10
    assert "| zero-shot | 0 (0.000%) | val " in out.stdout
    assert "| neuroada-k20-magnitude | 3.11M" in out.stdout and "(reference)" in out.stdout
    assert "acc_norm, mean |" in out.stdout


def test_llm_task_runs_alone(smollm2_dir, data_dir, capsys):  # noqa: F811
    with pytest.raises(SystemExit):
        bq.main(["--tasks", "arc,arc-llm", "--model", str(smollm2_dir), "--data", str(data_dir)])
    assert "arc-llm runs alone" in capsys.readouterr().err
