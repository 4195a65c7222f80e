"""neuroada_tools.train.data: causal-LM examples (examples.py) and classification (labels.py).

Hostile files are built in ``tmp_path`` and every error checks the exact message (helpers:
``tests/datakit.py``; tokenizer fixtures: ``tests/conftest.py``)."""

from __future__ import annotations

import json

import pytest

from neuroada_tools.errors import ModelError
from neuroada_tools.train.data import (
    IGNORE_INDEX,
    build_causal_lm_examples,
    build_classification_examples,
    format_prompt,
    read_records,
)
from tests.datakit import INSTR, _decode, _plain_ids, _raises, _write_jsonl

# ---------------------------------------------------------------------------------------------
# causal LM
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tok_name", ["lm_tok", "bos_tok"])
@pytest.mark.parametrize("extra", ["", "2 and 3"])
def test_prompt_is_masked_exactly(request, tok_name, extra):
    tok = request.getfixturevalue(tok_name)
    record = {
        "instruction": "Add two numbers.",
        "input": extra,
        "output": "the correct answer is 5",
    }
    (ex,) = build_causal_lm_examples([record], tok, max_length=512)
    prefix = [tok.bos_token_id] if tok_name == "bos_tok" else []
    n_prompt = len(prefix) + len(_plain_ids(tok, format_prompt(record["instruction"], extra)))
    ids, labels = ex["input_ids"], ex["labels"]
    assert ids[: len(prefix)] == prefix
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert IGNORE_INDEX not in labels[n_prompt:]
    assert ids[-1] == tok.eos_token_id
    assert _decode(tok, ids[n_prompt:]) == "the correct answer is 5</s>"
    assert _decode(tok, ids[len(prefix) : n_prompt]) == format_prompt(record["instruction"], extra)
    assert ex["attention_mask"] == [1] * len(ids)


def test_train_on_prompt_keeps_every_label(lm_tok):
    (ex,) = build_causal_lm_examples([INSTR], lm_tok, max_length=512, train_on_prompt=True)
    assert ex["labels"] == ex["input_ids"]


def test_text_format_trains_on_all_tokens(lm_tok):
    (ex,) = build_causal_lm_examples([{"text": "hello world"}], lm_tok, max_length=64)
    assert ex["labels"] == ex["input_ids"]
    assert _decode(lm_tok, ex["input_ids"]) == "hello world</s>"


def test_truncation_keeps_the_start_and_counts(lm_tok):
    records = [INSTR, {**INSTR, "output": "hello world " * 20}]
    full = build_causal_lm_examples(records, lm_tok, max_length=10_000)
    n_prompt = len(_plain_ids(lm_tok, format_prompt(INSTR["instruction"])))
    max_length = n_prompt + 3
    cut = build_causal_lm_examples(records, lm_tok, max_length=max_length)
    assert cut[1]["input_ids"] == full[1]["input_ids"][:max_length]
    assert cut[1]["labels"] == full[1]["labels"][:max_length]
    assert cut.stats.truncated == 1 + (len(full[0]["input_ids"]) > max_length)
    assert cut.stats.longest == len(full[1]["input_ids"])
    assert cut.stats.no_target == 0


def test_fully_truncated_response_still_builds(lm_tok):
    n_prompt = len(_plain_ids(lm_tok, format_prompt(INSTR["instruction"])))
    out = build_causal_lm_examples([INSTR], lm_tok, max_length=n_prompt - 2)
    assert len(out[0]["input_ids"]) == n_prompt - 2
    assert out[0]["labels"] == [IGNORE_INDEX] * (n_prompt - 2)
    assert (out.stats.examples, out.stats.truncated, out.stats.no_target) == (1, 1, 1)
    assert "1 with no target tokens left" in out.stats.describe()


def test_causal_lm_missing_field_names_line(tmp_path, lm_tok):
    p = _write_jsonl(tmp_path / "train.jsonl", [INSTR, {"instruction": "x", "input": ""}])
    with _raises(f"{p} line 2: missing field 'output' (instruction data needs it)"):
        build_causal_lm_examples(read_records(p), lm_tok, max_length=32)


def test_causal_lm_wrong_type_in_json_list(tmp_path, lm_tok):
    p = tmp_path / "train.json"
    p.write_text(json.dumps([INSTR, {**INSTR, "output": 5}], indent=1), encoding="utf-8")
    with _raises(f"{p} record 2 (line 8): field 'output' must be a string, found number"):
        build_causal_lm_examples(read_records(p), lm_tok, max_length=32)


def test_plain_list_records_named_by_index(lm_tok):
    with _raises("train.json record 3: field 'input' must be a string, found null"):
        build_causal_lm_examples(
            [INSTR, INSTR, {**INSTR, "input": None}], lm_tok, max_length=32, path="train.json"
        )
    with _raises("record 1: field 'text' is empty"):
        build_causal_lm_examples([{"text": "  "}], lm_tok, max_length=32)


def test_every_record_is_validated_before_tokenizing(lm_tok):
    calls = []

    class Spy:
        eos_token_id = lm_tok.eos_token_id

        def __call__(self, *args, **kwargs):
            calls.append(args)
            return lm_tok(*args, **kwargs)

    records = [INSTR] * 50 + [{"instruction": "x", "output": ["not", "text"]}]
    with _raises("record 51: field 'output' must be a string, found list"):
        build_causal_lm_examples(records, Spy(), max_length=32)
    assert calls == []
    assert len(build_causal_lm_examples(records[:50], Spy(), max_length=32)) == 50


def test_classification_data_refused_for_causal_lm(lm_tok):
    with _raises(
        "record 1: classification data has no response to train a causal LM on "
        "(use the instruction or text format, or a classification model)"
    ):
        build_causal_lm_examples([{"text": "a", "label": 1}], lm_tok, max_length=8)


def test_tokenizer_without_eos(enc_tok):
    with _raises(
        "tokenizer has no eos token; causal-LM examples end with it (set eos_token)", ModelError
    ):
        build_causal_lm_examples([INSTR], enc_tok, max_length=8)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, None])
def test_bad_max_length(lm_tok, bad):
    with _raises(f"max_length must be a positive integer, got {bad!r}"):
        build_causal_lm_examples([INSTR], lm_tok, max_length=bad)


# ---------------------------------------------------------------------------------------------
# classification
# ---------------------------------------------------------------------------------------------


def test_true_false_labels_map_false_0_true_1(enc_tok):
    records = [{"text": "a", "answer": "true"}, {"text": "b", "answer": "false"}]
    examples, names = build_classification_examples(
        records, enc_tok, max_length=16, label_field="answer"
    )
    assert names == ["false", "true"]
    assert [e["label"] for e in examples] == [1, 0]
    # only "true" present: still false=0, true=1
    examples, names = build_classification_examples(
        records[:1], enc_tok, max_length=16, label_field="answer"
    )
    assert (names, examples[0]["label"]) == (["false", "true"], 1)
    # JSON booleans count as the strings
    examples, names = build_classification_examples(
        [{"text": "a", "label": False}, {"text": "b", "label": True}],
        enc_tok,
        max_length=16,
        label_field="label",
    )
    assert (names, [e["label"] for e in examples]) == (["false", "true"], [0, 1])


def test_string_labels_sorted_and_padded_to_num_labels(enc_tok):
    records = [{"text": "a", "label": s} for s in ["pos", "neg", "neutral", "pos"]]
    examples, names = build_classification_examples(
        records, enc_tok, max_length=16, label_field="label"
    )
    assert names == ["neg", "neutral", "pos"]
    assert [e["label"] for e in examples] == [2, 0, 1, 2]
    _, names = build_classification_examples(
        records, enc_tok, max_length=16, label_field="label", num_labels=4
    )
    assert names == ["neg", "neutral", "pos", "LABEL_3"]


def test_string_labels_over_num_labels(tmp_path, enc_tok):
    p = _write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": s} for s in ["a", "b", "c"]])
    with _raises(
        f"{p} line 3: label 'c' gets id 2 (labels sorted: 3 distinct), outside range(2) "
        "(num_labels=2); pass label names to fix the mapping"
    ):
        build_classification_examples(
            read_records(p), enc_tok, max_length=16, label_field="label", num_labels=2
        )


def test_label_names_mapping_and_unknown_label(tmp_path, enc_tok):
    rows = [{"text": "a", "label": "yes"}, {"text": "b", "label": "no"}, {"text": "c", "label": 1}]
    examples, names = build_classification_examples(
        rows, enc_tok, max_length=16, label_field="label", label_names=["yes", "no"]
    )
    assert names == ["yes", "no"]
    assert [e["label"] for e in examples] == [0, 1, 1]
    p = _write_jsonl(tmp_path / "t.jsonl", [*rows, {"text": "d", "label": "maybe"}])
    with _raises(f"{p} line 4: unknown label 'maybe' (expected one of 'yes', 'no')"):
        build_classification_examples(
            read_records(p), enc_tok, max_length=16, label_field="label", label_names=["yes", "no"]
        )
    with _raises(f"{p} line 3: label 1 is outside range(1) (1 label names)"):
        build_classification_examples(
            read_records(p)[2:3], enc_tok, max_length=16, label_field="label", label_names=["yes"]
        )


def test_int_labels(tmp_path, enc_tok):
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 2}]
    examples, names = build_classification_examples(
        rows, enc_tok, max_length=16, label_field="label"
    )
    assert names == ["LABEL_0", "LABEL_1", "LABEL_2"]
    assert [e["label"] for e in examples] == [0, 2]
    p = _write_jsonl(tmp_path / "t.jsonl", [*rows, {"text": "c", "label": 3}])
    with _raises(f"{p} line 3: label 3 is outside range(3) (num_labels=3)"):
        build_classification_examples(
            read_records(p), enc_tok, max_length=16, label_field="label", num_labels=3
        )
    p = _write_jsonl(tmp_path / "n.jsonl", [{"text": "c", "label": -1}])
    with _raises(f"{p} line 1: label -1 is negative"):
        build_classification_examples(read_records(p), enc_tok, max_length=16, label_field="label")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"text": "b"}, "missing label field 'label'"),
        (
            {"text": "b", "label": 1.5},
            "label field 'label' must be an integer or a string, found number",
        ),
        (
            {"text": "b", "label": None},
            "label field 'label' must be an integer or a string, found null",
        ),
        ({"text": "b", "label": ""}, "label field 'label' is empty"),
        (
            {"text": "b", "label": 1},
            "label 1 is an integer but the first record's label is a string; "
            "use one kind, or pass label names",
        ),
        ({"text": 3, "label": "x"}, "field 'text' must be a string, found number"),
        ({"label": "x"}, "missing field 'text' (classification data needs it)"),
    ],
)
def test_classification_record_errors(tmp_path, enc_tok, row, message):
    p = _write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "x"}, row])
    with _raises(f"{p} line 2: {message}"):
        build_classification_examples(read_records(p), enc_tok, max_length=16, label_field="label")


def test_classification_argument_errors(enc_tok):
    rows = [{"text": "a", "label": "x"}]
    with _raises("num_labels=3 but 2 label names given"):
        build_classification_examples(
            rows, enc_tok, max_length=8, label_field="label", num_labels=3, label_names=["x", "y"]
        )
    with _raises("label names repeat a name: ['x', 'x']"):
        build_classification_examples(
            rows, enc_tok, max_length=8, label_field="label", label_names=["x", "x"]
        )
    with _raises("num_labels must be a positive integer, got 0"):
        build_classification_examples(
            rows, enc_tok, max_length=8, label_field="label", num_labels=0
        )


def test_instruction_records_as_classification(enc_tok):
    rows = [{**INSTR, "input": "world", "answer": "true"}, {**INSTR, "answer": "false"}]
    examples, names = build_classification_examples(
        rows, enc_tok, max_length=64, label_field="answer"
    )
    assert names == ["false", "true"]
    assert examples[0]["input_ids"] == enc_tok("Say hello.\nworld")["input_ids"]
    assert examples[1]["input_ids"] == enc_tok("Say hello.")["input_ids"]
    assert examples[0]["token_type_ids"] == [0] * len(examples[0]["input_ids"])
    assert set(examples[0]) == {"input_ids", "attention_mask", "token_type_ids", "label"}


def test_classification_text_field_and_truncation(enc_tok, lm_tok):
    rows = [{"body": "hello world " * 10, "y": 1}, {"body": "hello", "y": 0}]
    examples, _ = build_classification_examples(
        rows, enc_tok, max_length=6, label_field="y", text_field="body"
    )
    assert len(examples[0]["input_ids"]) == 6
    assert examples[0]["input_ids"][0] == enc_tok.cls_token_id
    assert examples[0]["input_ids"][-1] == enc_tok.sep_token_id
    assert examples.stats.truncated == 1 and examples.stats.longest == 22
    examples, _ = build_classification_examples(
        rows, lm_tok, max_length=6, label_field="y", text_field="body"
    )
    assert "token_type_ids" not in examples[0]
