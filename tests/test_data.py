"""Tests for neuroada_tools.train.data: reading, format detection, tokenization, masking, collate.

Tokenizers are trained here on a few sentences with the ``tokenizers`` library (no downloads).
Hostile files are built in ``tmp_path`` and every error checks the exact message. The real-data
tests read a few rows from ``$NEUROADA_DATA`` (default ``../shared/data`` next to the repo) and
are skipped when it is missing, unless ``CI=true``.
"""

from __future__ import annotations

import doctest
import json
import os
import re
import tracemalloc
from pathlib import Path

import pytest
import torch

from neuroada_tools.train import data as data_module
from neuroada_tools.train.data import (
    IGNORE_INDEX,
    PROMPT_TEMPLATE,
    PROMPT_TEMPLATE_NO_INPUT,
    RecordList,
    build_causal_lm_examples,
    build_classification_examples,
    build_multiple_choice_examples,
    collate,
    detect_format,
    format_prompt,
    parse_arc_choices,
    read_records,
)
from neuroada_tools.errors import DataError, ModelError

REPO = Path(__file__).resolve().parents[1]

SENTENCES = [
    PROMPT_TEMPLATE.format(instruction="Add two numbers.", input="2 and 3"),
    PROMPT_TEMPLATE_NO_INPUT.format(instruction="Say hello."),
    "the correct answer is true",
    "the correct answer is false",
    "Which gas do we breathe? nitrogen oxygen helium water vapor",
    "hello world, this is a tiny corpus for a tiny tokenizer.",
]


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------


def _bpe_tokenizer(bos_prefix: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(SENTENCES * 3, trainer)
    if bos_prefix:  # Llama-style: <s> before every text
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def _wordpiece_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    )
    tok.train_from_iterator(SENTENCES * 3, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


@pytest.fixture(scope="module")
def lm_tok():
    return _bpe_tokenizer()


@pytest.fixture(scope="module")
def bos_tok():
    return _bpe_tokenizer(bos_prefix=True)


@pytest.fixture(scope="module")
def enc_tok():
    return _wordpiece_tokenizer()


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _decode(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _plain_ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _raises(match_exact: str, exc=DataError):
    return pytest.raises(exc, match="^" + re.escape(match_exact) + "$")


INSTR = {"instruction": "Say hello.", "input": "", "output": "hello world", "answer": "x"}


# ---------------------------------------------------------------------------------------------
# read_records
# ---------------------------------------------------------------------------------------------


def test_read_jsonl_skips_blank_lines_and_bom(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n\n   \n{"text": "b"}')
    records = read_records(p)
    assert records == [{"text": "a"}, {"text": "b"}]
    assert records.locations == ["line 1", "line 4"]
    assert records.path == p
    assert records[1:].locations == ["line 4"]


def test_read_json_list_records_know_their_lines(tmp_path):
    p = tmp_path / "train.json"
    p.write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=1), encoding="utf-8")
    records = read_records(p)
    assert records == [{"text": "a"}, {"text": "b"}]
    assert records.locations == ["record 1 (line 2)", "record 2 (line 5)"]


def test_jsonl_invalid_json_names_file_and_line(tmp_path):
    p = _write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}, {"text": "b"}])
    with p.open("a") as f:
        f.write('{"text": "a" "b"}\n')
    with _raises(f"{p} line 3: invalid JSON (Expecting ',' delimiter at column 14)"):
        read_records(p)


def test_pretty_printed_single_object_gets_a_hint(tmp_path):
    p = tmp_path / "train.json"
    p.write_text(json.dumps({"text": "a"}, indent=2), encoding="utf-8")
    with _raises(
        f"{p} line 1: invalid JSON (Expecting property name enclosed in double quotes at "
        "column 2); a JSON file must hold a list of objects, JSONL one object per line"
    ):
        read_records(p)


def test_jsonl_line_not_an_object(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text('{"text": "a"}\n[1, 2]\n', encoding="utf-8")
    with _raises(f"{p} line 2: expected a JSON object, found list"):
        read_records(p)


def test_jsonl_first_line_a_string(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text('"just a string"\n', encoding="utf-8")
    with _raises(f"{p} line 1: expected a JSON object, found string"):
        read_records(p)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"[]", b"  [ \n ]  \n", b"\xef\xbb\xbf"])
def test_empty_files_have_no_records(tmp_path, content):
    p = tmp_path / "empty.json"
    p.write_bytes(content)
    with _raises(f"{p}: no records"):
        read_records(p)


def test_missing_file(tmp_path):
    p = tmp_path / "nope.jsonl"
    with _raises(f"{p}: cannot read (No such file or directory)"):
        read_records(p)


def test_jsonl_line_over_limit(tmp_path):
    p = tmp_path / "train.jsonl"
    ok = json.dumps({"text": "x" * 51})  # exactly 63 bytes before the newline: accepted
    assert len(ok) == 63
    p.write_text(ok + "\n" + ok + "\r\n", encoding="utf-8")
    assert read_records(p, max_record_bytes=63)[1]["text"] == "x" * 51
    p.write_text(ok, encoding="utf-8")  # no final newline
    assert len(read_records(p, max_record_bytes=63)) == 1
    p.write_text(ok + "\n" + json.dumps({"text": "x" * 52}) + "\n", encoding="utf-8")
    with _raises(f"{p} line 2: line is longer than the limit of 63 bytes"):
        read_records(p, max_record_bytes=63)


def test_jsonl_huge_line_is_not_read_whole(tmp_path):
    p = tmp_path / "huge.jsonl"
    with p.open("wb") as f:
        f.write(b'{"text": "a"}\n{"text": "')
        f.write(b"x" * (24 << 20))
        f.write(b'"}\n')
    tracemalloc.start()
    try:
        with _raises(f"{p} line 2: line is longer than the limit of 1048576 bytes"):
            read_records(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20  # the 24 MiB line never sat in memory


def test_jsonl_invalid_utf8(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with _raises(f"{p} line 2: not valid UTF-8 (byte 11 of the line)"):
        read_records(p)


def test_jsonl_nested_too_deeply(tmp_path):
    p = tmp_path / "deep.jsonl"
    p.write_text('{"a": ' + "[" * 200_000 + "]" * 200_000 + "}\n", encoding="utf-8")
    with _raises(f"{p} line 1: JSON nested too deeply"):
        read_records(p)


def test_json_list_element_not_an_object(tmp_path):
    p = tmp_path / "train.json"
    p.write_text('[\n  {"text": "a"},\n  3\n]\n', encoding="utf-8")
    with _raises(f"{p} record 2 (line 3): expected a JSON object, found number"):
        read_records(p)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '[\n{"text": "a"}\n{"text": "b"}\n]',
            "line 3: invalid JSON (Expecting ',' delimiter at column 1)",
        ),
        ('[\n{"text": "a"},\n]', "line 3: invalid JSON (Expecting value at column 1)"),
        ('[\n{"text": "a"},\n{"text": }\n]', "line 3: invalid JSON (Expecting value at column 10)"),
        (
            '[\n{"text": "a"}\n',
            "line 3: invalid JSON (Unterminated list, expecting ',' or ']' at column 1)",
        ),
        (
            '[{"text": "a"}]\n{"text": "b"}',
            "line 2: invalid JSON (Extra data after the end of the list at column 1)",
        ),
    ],
)
def test_json_list_syntax_errors(tmp_path, content, message):
    p = tmp_path / "train.json"
    p.write_text(content, encoding="utf-8")
    with _raises(f"{p} {message}"):
        read_records(p)


def test_json_list_record_over_limit(tmp_path):
    p = tmp_path / "train.json"
    p.write_text(json.dumps([{"text": "a"}, {"text": "é" * 40}], indent=2), encoding="utf-8")
    nbytes = len(json.dumps({"text": "é" * 40}, indent=2).replace("\n", "\n  ").encode())
    with _raises(f"{p} record 2 (line 5): record is {nbytes} bytes, over the limit of 64 bytes"):
        read_records(p, max_record_bytes=64)


def test_json_list_file_over_limit(tmp_path):
    p = tmp_path / "train.json"
    p.write_text(json.dumps([{"text": "a" * 100}]), encoding="utf-8")
    size = p.stat().st_size
    with _raises(
        f"{p}: file is {size} bytes, over the limit of 50 bytes for a JSON list "
        "(use JSONL, one object per line, for larger data)"
    ):
        read_records(p, max_file_bytes=50)


# ---------------------------------------------------------------------------------------------
# formats
# ---------------------------------------------------------------------------------------------


def test_docstring_examples():
    assert doctest.testmod(data_module).failed == 0


def test_detect_format():
    assert detect_format([INSTR]) == "instruction"
    assert detect_format([{"text": "a"}]) == "text"
    assert detect_format([{"text": "a", "label": 1}]) == "classification"


def test_detect_format_unknown_fields(tmp_path):
    p = _write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "completion": "b"}])
    with _raises(
        f"{p} line 1: cannot tell the data format from the fields ('prompt', 'completion'); "
        "expected 'instruction' (instruction data) or 'text' (plain text or classification)"
    ):
        detect_format(read_records(p))


def test_unknown_forced_format(lm_tok):
    with _raises(
        "unknown data format 'chat' (expected one of 'instruction', 'text', 'classification')"
    ):
        build_causal_lm_examples([INSTR], lm_tok, max_length=8, fmt="chat")


def test_prompt_templates_verbatim():
    assert PROMPT_TEMPLATE == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    )
    assert PROMPT_TEMPLATE_NO_INPUT == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    )
    assert format_prompt("Do {x}.", "") == PROMPT_TEMPLATE_NO_INPUT.replace(
        "{instruction}", "Do {x}."
    )
    assert format_prompt("A", "B").endswith(
        "### Instruction:\nA\n\n### Input:\nB\n\n### Response:\n"
    )


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


@pytest.fixture(scope="module")
def data_dir() -> Path:
    path = Path(os.environ.get("NEUROADA_DATA", REPO.parent / "shared" / "data"))
    if (
        not (path / "boolq" / "train.json").is_file()
        or not (path / "arc-easy" / "train.json").is_file()
    ):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"real data not found at {path} (set NEUROADA_DATA)")
        pytest.skip(f"real data not found at {path} (set NEUROADA_DATA)")
    return path


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
