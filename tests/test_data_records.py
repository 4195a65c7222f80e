"""neuroada_tools.train.data: reading files (records.py) and formats and prompts (prompts.py).

Hostile files are built in ``tmp_path`` and every error checks the exact message (helpers:
``tests/datakit.py``; tokenizer fixtures: ``tests/conftest.py``)."""

from __future__ import annotations

import doctest
import importlib
import json
import tracemalloc

import pytest

from neuroada_tools.train import data as data_module
from neuroada_tools.train.data import (
    PROMPT_TEMPLATE,
    PROMPT_TEMPLATE_NO_INPUT,
    build_causal_lm_examples,
    detect_format,
    format_prompt,
    read_records,
)
from tests.datakit import INSTR, _raises, _write_jsonl

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
    modules = [data_module, *(importlib.import_module(f"neuroada_tools.train.data.{m}") for m in
               ("records", "prompts", "chat", "examples", "labels", "choices", "collate", "demo"))]
    assert sum(doctest.testmod(m).failed for m in modules) == 0


def test_detect_format():
    assert detect_format([INSTR]) == "instruction"
    assert detect_format([{"text": "a"}]) == "text"
    assert detect_format([{"text": "a", "label": 1}]) == "classification"


def test_detect_format_unknown_fields(tmp_path):
    p = _write_jsonl(tmp_path / "train.jsonl", [{"question": "a", "reply": "b"}])
    with _raises(
        f"{p} line 1: cannot tell the data format from the fields ('question', 'reply'); "
        "expected 'instruction' (instruction data), 'text' (plain text or classification), 'messages' "
        "(conversational) or 'prompt' and 'completion'"
    ):
        detect_format(read_records(p))


def test_unknown_forced_format(lm_tok):
    with _raises(
        "unknown data format 'chat' (expected one of 'instruction', 'text', 'classification', "
        "'conversational', 'prompt-completion')"
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
