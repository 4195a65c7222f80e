"""evaluate: both scorings agree, example by example, with an independent computation (one unpadded
forward per sequence, ``tests/evalkit.py``) on every form of a tiny tuned decoder; classification by
the head's argmax; the answer rules; bad records refused before any model loads.

The tiny decoder is the fixture Llama with 256 positions (its RoPE weights do not depend on the
limit; the 64 of the fixture are too few for the Alpaca template) and a random delta, merged and
exported to ONNX (``tests/genkit.py``). SmolLM2 runs in ``test_evaluate_smollm2.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from neuroada_tools.cli import main
from neuroada_tools.errors import DataError
from neuroada_tools.evaluate import answers
from neuroada_tools.evaluate.records import to_items
from neuroada_tools.train.data import read_records
from tests import chatkit
from tests.evalkit import greedy_text, sequence_logprob

chat_tok = chatkit.chat_tok

QUESTIONS = [
    ("What is red?", ["the sky", "blood", "grass"], 1),
    ("Which one is a fruit?", ["apple", "stone"], 0),
    ("Where do fish live?", ["in water", "in the desert", "on the moon", "in trees"], 0),
    ("The quick brown fox", ["jumps", "sleeps", "runs away"], 2),
    ("What is two plus three?", ["five", "six"], 0),
]


def arc_record(q: str, options: list[str], gold: int) -> dict:
    body = " ".join(f"Answer{k}: {o}" for k, o in enumerate(options, start=1))
    fmt = "/".join(f"answer{k}" for k in range(1, len(options) + 1))
    instruction = f"Please choose the correct answer to the question: {q}\n\n{body}\n\nAnswer format: {fmt}"
    return {"instruction": instruction, "input": "", "output": f"the correct answer is answer{gold + 1}",
            "answer": f"answer{gold + 1}"}


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def evaluate_json(*args) -> dict:
    r = run_cli("evaluate", *args, "--json", "-q")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def long_llama(fixture_models, tmp_path_factory):
    """The tuned tiny Llama (``genkit.Forms``) with 256 positions."""
    from tests.genkit import forms_getter

    root = tmp_path_factory.mktemp("long-llama")
    base = root / "base"
    shutil.copytree(fixture_models["llama"], base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["max_position_embeddings"] = 256
    (base / "config.json").write_text(json.dumps(cfg))
    (root / "forms").mkdir()
    return forms_getter({"llama": base}, root / "forms")("llama")


@pytest.fixture(scope="module")
def arc_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "arc.json"
    path.write_text(json.dumps([arc_record(*q) for q in QUESTIONS], indent=1))
    return path


def _merged_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _within_vocab(ids: list[int], tok, vocab: int) -> list[int]:
    return [i for i in ids if i < vocab or i not in set(tok.all_special_ids)]


def _independent_pairs(tok, item, style: str, vocab: int):
    """Context and continuation ids written out from the tokenizer's plain calls, for the reference."""
    if style == "template":  # the prompt with the tokenizer's own specials, the option on its own
        ctx = tok(item.prompt)["input_ids"]
        return [(_within_vocab(ctx, tok, vocab), tok(o, add_special_tokens=False)["input_ids"]) for o in item.options]
    context = f"Question: {item.question}\nAnswer:"
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    return [(ctx, tok(context + " " + o, add_special_tokens=False)["input_ids"][len(ctx):]) for o in item.options]


@pytest.mark.parametrize("style", ["template", "lm-eval"])
def test_loglik_matches_independent_per_option_logprobs_on_every_form(long_llama, arc_file, tmp_path, style):
    f = long_llama
    model = _merged_model(f.merged)
    from neuroada_tools.hf import load_tokenizer

    tok = load_tokenizer(f.base)
    vocab = model.get_input_embeddings().num_embeddings
    items = to_items(read_records(arc_file))
    expected = [[sequence_logprob(model, c, o) for c, o in _independent_pairs(tok, it, style, vocab)] for it in items]
    forms = {"unmerged": f.unmerged_args(), "merged": ["--merged", f.merged], "onnx": ["--onnx", f.onnx]}
    for name, args in forms.items():
        out = tmp_path / f"{name}.jsonl"
        s = evaluate_json(*args, "--data", arc_file, "--scoring", "loglik", "--prompt-style", style,
                          "--batch-size", 3, "--predictions", out)
        got = rows(out)
        assert len(got) == len(QUESTIONS) and s["examples"] == len(QUESTIONS)
        for q, (row, exp) in enumerate(zip(got, expected)):
            assert row["option_logprob"] == pytest.approx(exp, abs=2e-4), (name, q)
            best = max(range(len(exp)), key=lambda k: exp[k])
            norm = [e / len(o.encode()) for e, o in zip(exp, QUESTIONS[q][1])]
            assert row["pred"] == best and row["pred_norm"] == max(range(len(norm)), key=lambda k: norm[k])
            assert row["correct"] == (best == QUESTIONS[q][2])
        assert s["acc"] == sum(r["correct"] for r in got) / len(got)
        assert s["acc_norm"] == sum(r["correct_norm"] for r in got) / len(got)
        assert s["interval95"] == list(answers.wilson(sum(r["correct"] for r in got), len(got)))


def test_generation_matches_independent_greedy_decoding_on_every_form(long_llama, tmp_path):
    """References are the independent greedy texts for odd records and something else for even
    ones, so ``correct`` must be exactly the odd records under the exact-match rule."""
    f = long_llama
    model = _merged_model(f.merged)
    from neuroada_tools.hf import load_tokenizer

    tok = load_tokenizer(f.base)
    vocab = model.get_input_embeddings().num_embeddings
    prompts = ["Say hello.", "Name a colour.", "What is two plus three?", "Tell a story.", "Count to three."]
    records = [{"instruction": p, "output": "x"} for p in prompts]
    from neuroada_tools.train.data import format_prompt

    texts = [greedy_text(model, tok, _within_vocab(tok(format_prompt(p))["input_ids"], tok, vocab), 6,
                         {model.config.eos_token_id}, vocab) for p in prompts]
    for n, r in enumerate(records):
        r["output"] = texts[n] if n % 2 and texts[n].strip() else "zebra zebra"
    data = tmp_path / "free.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    forms = {"unmerged": f.unmerged_args(), "merged": ["--merged", f.merged], "onnx_past": ["--onnx", f.onnx,
             "--with-past"], "onnx": ["--onnx", f.onnx]}
    for name, args in forms.items():
        out = tmp_path / f"{name}.jsonl"
        s = evaluate_json(*args, "--data", data, "--max-new-tokens", 6, "--batch-size", 2, "--predictions", out)
        got = rows(out)
        assert s["rule"] == "exact" and s["scoring"] == "generate"
        assert [r["generated"] for r in got] == texts, name
        assert [r["correct"] for r in got] == [bool(n % 2 and texts[n].strip()) for n in range(5)], name
        assert s["correct"] == sum(r["correct"] for r in got)


def test_classification_is_the_argmax_of_the_head(fixture_models, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from neuroada_tools.hf import load_tokenizer

    folder = fixture_models["bert-cls"]
    texts = ["i loved the music", "the food was cold", "what a day", "a great film", "never again"]
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = load_tokenizer(folder)
    with torch.no_grad():
        preds = [int(model(**tok(t, return_tensors="pt")).logits.argmax()) for t in texts]
    labels = [p if n % 2 else 1 - p for n, p in enumerate(preds)]
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in zip(texts, labels)))
    out = tmp_path / "p.jsonl"
    s = evaluate_json("--model", folder, "--data", data, "--predictions", out)
    assert s["scoring"] == "classification" and s["correct"] == 2
    assert [r["pred"] for r in rows(out)] == preds


# --------------------------------------------------------------------------- answers and records


@pytest.mark.parametrize("rule, text, expected", [
    ("boolq", "the correct answer is true, not false", "true"),
    ("boolq", "The correct answer is True", None),  # case-sensitive, as the authors' rule
    ("choice", "the correct answer is answer3. answer1 is wrong", "answer3"),
    ("piqa", "solution2", "solution2"),
    ("hellaswag", "ending4 then ending1", "ending4"),
    ("winogrande", "option1", "option1"),
    ("number", "5 + 7 = 12, so 1,200 apples", "1200.0"),
    ("number", "no digits", None),
    ("letter", "the answer is C", "C"),
    ("exact", "   ", None),
])
def test_extraction_rules(rule, text, expected):
    assert answers.extract(rule, text) == expected


def test_rules_compare_and_detect():
    assert answers.is_correct("number", "12.0005", "12") and not answers.is_correct("number", "12.01", "12")
    assert answers.is_correct("exact", "The Eiffel-Tower!", "eiffel tower") is False
    assert answers.is_correct("exact", "  The Eiffel Tower. ", "eiffel tower")
    assert answers.detect_rule(["true", "false"]) == "boolq"
    assert answers.detect_rule(["answer1", "answer5"]) == "choice"
    assert answers.detect_rule(["1,200", "-3.5"]) == "number"
    assert answers.detect_rule(["Paris"]) == "exact"


def test_wilson_interval_worked_values():
    lo, hi = answers.wilson(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    assert answers.wilson(0, 0) == (0.0, 1.0) and answers.wilson(10, 10)[1] == pytest.approx(1.0)


def test_records_give_options_from_the_instruction_and_from_lists(tmp_path):
    data = tmp_path / "mixed.jsonl"
    lines = [arc_record("What is red?", ["sky", "blood"], 1),
             {"instruction": "Please answer with true or false: is ice cold?\n\nAnswer format: true/false",
              "output": "the correct answer is true", "answer": "true"},
             {"question": "Pick B", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "B"},
             {"question": "Pick 0", "options": ["p", "q", "r"], "answer": 0}]
    data.write_text("".join(json.dumps(r) + "\n" for r in lines))
    items = to_items(read_records(data))
    assert [(it.options, it.gold) for it in items] == [(["sky", "blood"], 1), (["true", "false"], 0),
                                                       (["x", "y"], 1), (["p", "q", "r"], 0)]
    assert items[0].question == "What is red?" and items[2].prompt.endswith("Pick B\n\n### Response:\n")


@pytest.mark.parametrize("record, message", [
    ({"instruction": "Q? Answer1: a Answer2: b", "answer": "answer3"}, "expected answer1..answer2"),
    ({"question": "Q", "options": ["a"], "answer": 0}, "at least 2"),
    ({"question": "Q", "options": ["a", "b"], "answer": "C"}, "none of the options"),
    ({"foo": 1}, "cannot tell the record kind"),
    ({"instruction": "Q", "output": ""}, "no reference"),
])
def test_a_bad_record_is_one_line_naming_file_and_line_before_any_model_loads(tmp_path, record, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"instruction": "fine", "output": "ok"}) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=f"bad.jsonl line 3: .*{message}"):
        to_items(read_records(data))
    r = run_cli("evaluate", "--merged", tmp_path / "no-such-model", "--data", data, "-q")
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.jsonl line 3" in lines[0] and "no-such-model" not in lines[0]


def test_references_must_fit_the_rule_and_options_are_needed_for_loglik(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "Q", "output": "o", "answer": "12"}) + "\n"
                    + json.dumps({"instruction": "Q", "output": "o", "answer": "twelve"}) + "\n")
    r = run_cli("evaluate", "--merged", tmp_path / "none", "--data", data, "--rule", "number", "-q")
    assert r.exit_code == 2 and "d.jsonl line 2: reference 'twelve' does not fit the answer rule 'number'" in r.stderr
    r = run_cli("evaluate", "--merged", tmp_path / "none", "--data", data, "--scoring", "loglik", "-q")
    assert r.exit_code == 2 and "d.jsonl line 1: no options" in r.stderr


def test_too_long_for_the_model_is_refused_naming_the_record(fixture_models, arc_file):
    r = run_cli("evaluate", "--merged", fixture_models["llama"], "--data", arc_file, "--limit", 1, "-q")
    assert r.exit_code == 2 and "arc.json record 1 (line 2):" in r.stderr and "64 positions" in r.stderr


def test_chat_records_prompt_with_exactly_the_training_ids(tmp_path, chat_tok):
    """Conversational and prompt-completion records (and instruction records under ``--template chat``)
    are prompted with the ids ``train.data.chat.render_prompts`` gives, i.e. ``apply_chat_template`` of
    the turns before the reference with the generation prompt; the reference is the last assistant turn."""
    tok = chat_tok
    records = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye now"}]},
        {"prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "4"}]},
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    items = to_items(read_records(data), "alpaca", path=data, tokenizer=lambda: tok)
    first = tok.apply_chat_template(records[0]["messages"][:3], add_generation_prompt=True, tokenize=True)
    second = tok.apply_chat_template(records[1]["prompt"], add_generation_prompt=True, tokenize=True)
    as_ids = [list(x["input_ids"]) if isinstance(x, dict) or hasattr(x, "keys") else list(x) for x in (first, second)]
    assert [it.prompt_ids for it in items] == as_ids
    assert [it.reference for it in items] == ["Bye now", "4"] and {it.kind for it in items} == {"chat"}
    inst = tmp_path / "inst.jsonl"
    inst.write_text(json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n")
    item = to_items(read_records(inst), "chat", path=inst, tokenizer=lambda: tok)[0]
    want = tok.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True, tokenize=True)
    assert item.prompt_ids == (list(want["input_ids"]) if hasattr(want, "keys") else list(want))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]})
                   + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl line 1: .*unknown role 'robot'"):
        to_items(read_records(bad), "alpaca", path=bad, tokenizer=lambda: tok)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_shared_context_scores_equal_the_batched_ones(fixture_models, name):
    """``loglik_scores_shared`` (one context forward, options on its KV cache) gives the sums of the batched,
    right-padded ``loglik_scores``: ragged groups (1, 3 and 5 options), one-token and long continuations,
    a context repeated in two groups that are not neighbours; and torch forms take that path."""
    from transformers import AutoModelForCausalLM

    from neuroada_tools.evaluate import scoring
    from neuroada_tools.evaluate.run import _shareable
    from neuroada_tools.forms import open_form

    model = AutoModelForCausalLM.from_pretrained(fixture_models[name]).eval()
    g = torch.Generator().manual_seed(5)

    def ids(n):
        return torch.randint(3, 200, (n,), generator=g).tolist()

    a, b, c = ids(7), ids(2), ids(11)
    pairs = [(a, ids(1)), (b, ids(4)), (b, ids(1)), (b, ids(9)), (c, ids(3)), (c, ids(1)), (c, ids(2)), (c, ids(6)),
             (c, ids(5)), (a, ids(3))]
    with torch.no_grad():
        batched = scoring.loglik_scores(lambda x: model(**x).logits, pairs, pad_id=0, batch_size=4)
    seen = []
    shared = scoring.loglik_scores_shared(model, pairs, pad_id=0, progress=seen.append)
    assert shared == pytest.approx(batched, abs=1e-5)
    assert seen == [1, 3, 5, 1]  # one progress step per context group, counted in options
    assert _shareable(open_form(model=fixture_models[name])) is not None
