"""neuroada_tools.train.data: multiple choice (choices.py), collate (collate.py), and a few rows
of the real LLM-Adapters BoolQ / ARC-Easy data from ``$NEUROADA_DATA``.

Hostile files are built in ``tmp_path`` and every error checks the exact message (helpers:
``tests/datakit.py``; tokenizer fixtures: ``tests/conftest.py``)."""

from __future__ import annotations

import json

import pytest
import torch

from neuroada_tools.train.data import (
    IGNORE_INDEX,
    RecordList,
    build_causal_lm_examples,
    build_classification_examples,
    build_multiple_choice_examples,
    collate,
    format_prompt,
    parse_arc_choices,
    read_records,
)
from tests.datakit import _decode, _raises

# ---------------------------------------------------------------------------------------------
# multiple choice
# ---------------------------------------------------------------------------------------------


def _arc(question: str, options: list[str]) -> str:
    body = " ".join(f"Answer{i}: {o}" for i, o in enumerate(options, 1))
    fmt = "/".join(f"answer{i}" for i in range(1, len(options) + 1))
    return (
        f"Please choose the correct answer to the question: {question}\n\n{body}\n\n"
        f"Answer format: {fmt}"
    )


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_parse_arc_choices(n):
    options = [f"option number {i}, with words." for i in range(1, n + 1)]
    assert parse_arc_choices(_arc("Which one?\nReally?", options)) == (
        "Which one?\nReally?",
        options,
    )


def test_parse_arc_choices_without_boilerplate():
    assert parse_arc_choices("Pick one. Answer1: red Answer2: blue") == (
        "Pick one.",
        ["red", "blue"],
    )


@pytest.mark.parametrize(
    ("instruction", "message"),
    [
        ("What is 2 + 2?", "no 'Answer1:' option found in the instruction"),
        (
            "Please choose the correct answer to the question: \n\nAnswer1: a Answer2: b",
            "no question before 'Answer1:'",
        ),
        (
            "Q?\n\nAnswer1: a\n\nAnswer format: answer1",
            "found only 1 option ('Answer1:'); need at least 2",
        ),
        ("Q?\n\nAnswer1: a Answer2:  Answer3: c", "option 2 is empty"),
        (
            "Q?\n\nAnswer1: a Answer3: c",
            "option 1 contains 'Answer3:'; options must be numbered Answer1, Answer2, ... in order",
        ),
        (
            "Q?\n\nAnswer1: a Answer2: b\n\nAnswer format: answer1/answer2/answer3",
            "'Answer format' lists 3 options but 2 were found",
        ),
    ],
)
def test_parse_arc_choices_errors(instruction, message):
    with _raises(message):
        parse_arc_choices(instruction)


def test_multiple_choice_examples(enc_tok):
    rows = [
        {
            "instruction": _arc("Which gas?", ["nitrogen", "oxygen", "helium"]),
            "input": "",
            "answer": "answer2",
        },
        {
            "instruction": _arc("Say?", ["hello", "world", "a", "b", "c"]),
            "input": "",
            "answer": "answer5",
        },
    ]
    examples = build_multiple_choice_examples(rows, enc_tok, max_length=32)
    assert [e["label"] for e in examples] == [1, 4]
    assert [len(e["input_ids"]) for e in examples] == [3, 5]
    assert examples[0]["input_ids"][1] == enc_tok("Which gas?", "oxygen")["input_ids"]
    assert examples[0]["token_type_ids"][1] == enc_tok("Which gas?", "oxygen")["token_type_ids"]
    batch = collate(examples, enc_tok.pad_token_id)
    assert batch["input_ids"].shape[:2] == (2, 5)
    assert batch["choice_mask"].tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    # a padded choice repeats the first option, so no row is all padding
    assert torch.equal(batch["input_ids"][0, 3], batch["input_ids"][0, 0])
    assert batch["attention_mask"].sum(-1).min() > 0
    assert batch["labels"].tolist() == [1, 4]


def test_multiple_choice_errors(tmp_path, enc_tok):
    good = {"instruction": _arc("Q?", ["a", "b", "c", "d"]), "input": "", "answer": "answer1"}
    p = tmp_path / "arc.json"
    p.write_text(json.dumps([good, {**good, "answer": "answer5"}], indent=1), encoding="utf-8")
    with _raises(f"{p} record 2 (line 7): answer 'answer5' but the question has 4 options"):
        build_multiple_choice_examples(read_records(p), enc_tok, max_length=32)
    p.write_text(json.dumps([good, {**good, "answer": "B"}], indent=1), encoding="utf-8")
    with _raises(f"{p} record 2 (line 7): answer 'B' is not of the form 'answerN'"):
        build_multiple_choice_examples(read_records(p), enc_tok, max_length=32)
    p.write_text(json.dumps([{**good, "instruction": "Q? Answer1: a"}], indent=1), encoding="utf-8")
    with _raises(f"{p} record 1 (line 2): found only 1 option ('Answer1:'); need at least 2"):
        build_multiple_choice_examples(read_records(p), enc_tok, max_length=32)
    with _raises("record 1: missing field 'answer' (multiple-choice data needs it)"):
        build_multiple_choice_examples(
            [{"instruction": good["instruction"]}], enc_tok, max_length=32
        )
    with _raises(
        "max_length=3 leaves no room for text (the tokenizer adds 3 special tokens to a pair)"
    ):
        build_multiple_choice_examples([good], enc_tok, max_length=3)


def test_multiple_choice_truncation(enc_tok):
    row = {"instruction": _arc("hello world " * 20, ["hello", "world"]), "answer": "answer1"}
    examples = build_multiple_choice_examples([row], enc_tok, max_length=10)
    assert [len(ids) for ids in examples[0]["input_ids"]] == [10, 10]
    assert examples.stats.truncated == 2


# ---------------------------------------------------------------------------------------------
# collate
# ---------------------------------------------------------------------------------------------


def test_collate_causal_lm(lm_tok):
    examples = build_causal_lm_examples(
        [{"text": "hello"}, {"text": "hello world, this is"}], lm_tok, max_length=64
    )
    batch = collate(examples, lm_tok.pad_token_id, pad_to_multiple_of=8)
    n0, n1 = (len(e["input_ids"]) for e in examples)
    seq = -(-n1 // 8) * 8
    assert n0 < n1 < seq
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (2, seq) and batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][0, n0:].tolist() == [lm_tok.pad_token_id] * (seq - n0)
    assert batch["attention_mask"].sum(-1).tolist() == [n0, n1]
    assert batch["labels"][0, n0:].tolist() == [IGNORE_INDEX] * (seq - n0)
    assert collate(examples, lm_tok.pad_token_id)["input_ids"].shape == (2, n1)
    assert batch["labels"][1, :n1].tolist() == examples[1]["labels"]


def test_collate_classification(enc_tok):
    examples, _ = build_classification_examples(
        [{"text": "hello", "label": 1}, {"text": "hello world hello", "label": 0}],
        enc_tok,
        max_length=16,
        label_field="label",
    )
    batch = collate(examples, enc_tok.pad_token_id)
    assert (
        batch["input_ids"].shape
        == batch["token_type_ids"].shape
        == batch["attention_mask"].shape
        == (2, 5)
    )
    assert batch["labels"].tolist() == [1, 0]
    assert batch["input_ids"][0, 3:].tolist() == [enc_tok.pad_token_id] * 2


def test_collate_misuse(lm_tok):
    with pytest.raises(ValueError, match=r"^collate needs at least one example$"):
        collate([], 0)
    lm = {"input_ids": [1], "attention_mask": [1], "labels": [1]}
    cls = {"input_ids": [1], "attention_mask": [1], "label": 0}
    with pytest.raises(
        ValueError, match=r"^collate got a mix of example kinds \(causal LM and classification\)$"
    ):
        collate([lm, cls], 0)
    with pytest.raises(ValueError, match=r"^pad_token_id must be an int, got None$"):
        collate([lm], None)
    unlabelled = collate([{"input_ids": [5], "attention_mask": [1]}], 0)
    assert set(unlabelled) == {"input_ids", "attention_mask"}


# ---------------------------------------------------------------------------------------------
# real data (LLM-Adapters BoolQ / ARC-Easy)
# ---------------------------------------------------------------------------------------------


def test_real_arc_rows_parse(data_dir):
    records = read_records(data_dir / "arc-easy" / "train.json")
    counts = {}
    for record in records:
        question, options = parse_arc_choices(record["instruction"])
        assert question and not question.startswith("Please choose")
        assert all(o and "Answer" not in o for o in options)
        assert 1 <= int(record["answer"][len("answer") :]) <= len(options)
        counts[len(options)] = counts.get(len(options), 0) + 1
    assert {3, 4, 5} <= set(counts)
    assert parse_arc_choices(records[0]["instruction"]) == (
        "Which factor will most likely cause a person to develop a fever?",
        [
            "a leg muscle relaxing after exercise",
            "a bacterial population in the bloodstream",
            "several viral particles on the skin",
            "carbohydrates being digested in the stomach",
        ],
    )


def test_real_arc_multiple_choice_batch(data_dir, enc_tok):
    records = read_records(data_dir / "arc-easy" / "train.json")
    n_options = [len(parse_arc_choices(r["instruction"])[1]) for r in records]
    pick = [n_options.index(3), n_options.index(5), 0]  # 3, 5 and 4 options
    subset = RecordList(
        [records[i] for i in pick],
        path=records.path,
        locations=[records.locations[i] for i in pick],
    )
    examples = build_multiple_choice_examples(subset, enc_tok, max_length=64)
    batch = collate(examples, enc_tok.pad_token_id)
    assert [len(e["input_ids"]) for e in examples] == [3, 5, 4]
    assert batch["input_ids"].shape[:2] == (3, 5)
    assert batch["choice_mask"].sum(-1).tolist() == [3, 5, 4]
    assert batch["labels"].tolist() == [int(records[i]["answer"][6:]) - 1 for i in pick]


def test_real_boolq_rows(data_dir, lm_tok, enc_tok):
    records = read_records(data_dir / "boolq" / "train.json")[:20]
    assert records.locations[1] == "record 2 (line 8)"
    examples, names = build_classification_examples(
        records, enc_tok, max_length=128, label_field="answer"
    )
    assert names == ["false", "true"]
    assert [e["label"] for e in examples] == [int(r["answer"] == "true") for r in records]
    lm = build_causal_lm_examples(records[:5], lm_tok, max_length=512)
    for record, ex in zip(records[:5], lm, strict=True):
        n_prompt = ex["labels"].count(IGNORE_INDEX)
        assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert _decode(lm_tok, ex["input_ids"][n_prompt:]) == record["output"] + "</s>"
        assert _decode(lm_tok, ex["input_ids"][:n_prompt]) == format_prompt(record["instruction"])
