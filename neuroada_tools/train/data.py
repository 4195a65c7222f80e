"""Read training data, tokenize it and mask prompts for ``train-sparse``.

What this file does
-------------------
1. :func:`read_records` reads a data file into a list of JSON objects. Two layouts are accepted:
   a JSON file holding one list of objects (the LLM-Adapters layout, e.g. ``boolq/train.json``),
   or JSONL (one object per line, blank lines ignored). The layout is chosen by the first
   non-blank character of the file: ``[`` means a JSON list, anything else JSONL. Every record
   remembers where it came from (``line 7`` for JSONL, ``record 3 (line 12)`` for a JSON list),
   so every later error names the file and the line.
2. Three record formats, detected from the fields of the first record (:func:`detect_format`)
   or forced with ``fmt=``:

   - ``instruction``: ``instruction`` (str), ``output`` (str), optional ``input`` (str, default
     ``""``), optional ``answer`` (ignored by the causal-LM builder, a label for classification);
   - ``text``: ``{"text": ...}``, trained on every token;
   - ``classification``: a text field (default ``text``) and a label field (default ``label``).
3. Builders turn records into token-id examples. Each one validates *every* record before it
   tokenizes anything, so bad data fails before training starts, never in the middle of it:

   - :func:`build_causal_lm_examples` -> ``input_ids``, ``attention_mask``, ``labels``;
   - :func:`build_classification_examples` -> ``input_ids``, ``attention_mask``,
     (``token_type_ids``), ``label``, plus the label names in id order;
   - :func:`build_multiple_choice_examples` -> one (question, option) encoding per option and
     the index of the right one (ARC-Easy with an encoder).
4. :func:`collate` right-pads a list of examples into tensors.

The prompt template (LLM-Adapters / Alpaca)
-------------------------------------------
With a non-empty ``input``::

    Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Input:
    {input}

    ### Response:

and with an empty or missing ``input``::

    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Response:

Each prompt ends with ``"### Response:\\n"``; the ``output`` follows it directly and the tokenizer's
eos token follows the output. (LLM-Adapters' ``finetune.py`` has stray indentation and trailing
spaces inside its f-strings; this module uses the clean Alpaca text, as the constants
:data:`PROMPT_TEMPLATE` and :data:`PROMPT_TEMPLATE_NO_INPUT` spell it out.)

Tokenization and masking
------------------------
A causal-LM example is ``prefix + ids(prompt) + ids(output) + [eos]``, where ``prefix`` is what
the tokenizer puts before a text on its own (``<s>`` for Llama, nothing for GPT-2) and the prompt
and output are tokenized separately, without special tokens. The prompt therefore has exactly the
tokens it has at generation time, when it is tokenized alone, and the mask boundary is exact:
``labels`` is ``-100`` on ``prefix + ids(prompt)`` (unless ``train_on_prompt``) and equals
``input_ids`` elsewhere. Worked example (GPT-2-like tokenizer, no prefix, eos id 2)::

    prompt ids [11, 12, 13], output ids [21, 22], max_length 16
    input_ids = [11, 12, 13, 21, 22, 2]
    labels    = [-100, -100, -100, 21, 22, 2]

Too-long examples are cut to ``max_length`` keeping the start. If the cut removes the whole
response, the example stays, with every label ``-100``; :class:`BuildStats` counts such examples
(``no_target``) so the caller can warn or refuse. Note that a batch in which every label is
``-100`` gives a NaN mean loss in Hugging Face models; the training loop has to skip it.

Labels for classification
-------------------------
Integer labels are used as they are (names ``LABEL_0``, ``LABEL_1``, ... as in Hugging Face
configs). String labels are mapped by ``label_names`` when given; otherwise the sorted unique
strings get ids 0, 1, ... with one special case: when every label is ``"false"`` or ``"true"``
(BoolQ) the names are always ``["false", "true"]``, so ``false`` is 0 and ``true`` is 1 even if
a file holds only one of them. JSON booleans count as the strings ``"false"`` / ``"true"``.

What this file leaves out
-------------------------
Sequence packing, sentence-pair classification (two text fields), streaming of data that does
not fit in memory, and left padding (generation batches pad on the left; training does not need
to).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch

from neuroada_tools.errors import DataError, ModelError

if TYPE_CHECKING:  # pragma: no cover - typing only; importing transformers is slow
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_MAX_FILE_BYTES",
    "DEFAULT_MAX_RECORD_BYTES",
    "FORMATS",
    "IGNORE_INDEX",
    "PROMPT_TEMPLATE",
    "PROMPT_TEMPLATE_NO_INPUT",
    "BuildStats",
    "Examples",
    "RecordList",
    "build_causal_lm_examples",
    "build_classification_examples",
    "build_multiple_choice_examples",
    "collate",
    "detect_format",
    "format_prompt",
    "parse_arc_choices",
    "read_records",
]

PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
"""Alpaca / LLM-Adapters prompt for records with a non-empty ``input``."""

PROMPT_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
"""Alpaca / LLM-Adapters prompt for records whose ``input`` is empty or missing."""

FORMATS = ("instruction", "text", "classification")
"""Record formats understood by the builders."""

IGNORE_INDEX = -100
"""Label value that Hugging Face losses skip (prompt tokens, padding)."""

DEFAULT_MAX_RECORD_BYTES = 1 << 20
"""Largest JSONL line or JSON-list record accepted, in bytes (1 MiB)."""

DEFAULT_MAX_FILE_BYTES = 2 << 30
"""Largest JSON-list file accepted, in bytes (2 GiB); a JSON list is parsed whole, JSONL is not."""

MAX_INFERRED_LABELS = 100_000
"""Largest class count inferred from integer labels (``max + 1``) without ``num_labels``: a stray
``1e12`` label would otherwise build a billion label names."""

_ARC_PREFIX = "Please choose the correct answer to the question:"
_JSON_WS = re.compile(r"[ \t\n\r]*")
_BOM = b"\xef\xbb\xbf"


# --------------------------------------------------------------------------------------------
# Records and where they came from
# --------------------------------------------------------------------------------------------


class RecordList(list):  # type: ignore[type-arg]
    """A list of record dicts that remembers the file and the location of each record.

    ``locations[i]`` is ``"line 7"`` (JSONL) or ``"record 3 (line 12)"`` (JSON list). A plain
    ``list`` works wherever a ``RecordList`` does; its records are then named ``record N``.
    Slicing keeps the locations.
    """

    def __init__(
        self,
        records: Iterable[dict[str, Any]] = (),
        *,
        path: str | os.PathLike[str] | None = None,
        locations: Sequence[str] | None = None,
    ) -> None:
        super().__init__(records)
        self.path = path
        self.locations = (
            list(locations)
            if locations is not None
            else [f"record {i + 1}" for i in range(len(self))]
        )

    def __getitem__(self, key):  # type: ignore[no-untyped-def]
        if isinstance(key, slice):
            return RecordList(
                list.__getitem__(self, key), path=self.path, locations=self.locations[key]
            )
        return list.__getitem__(self, key)


class _Locator:
    """Builds the ``"<file> line 7"`` prefix of error messages for record ``i``."""

    def __init__(
        self, records: Sequence[Mapping[str, Any]], path: str | os.PathLike[str] | None
    ) -> None:
        if path is None and isinstance(records, RecordList):
            path = records.path
        self.name = str(path) if path is not None else None
        self.locations = records.locations if isinstance(records, RecordList) else None

    def at(self, i: int) -> str:
        if self.locations is not None and i < len(self.locations):
            where = self.locations[i]
        else:
            where = f"record {i + 1}"
        return f"{self.name} {where}" if self.name else where

    def file(self) -> str:
        return self.name if self.name else "data"


def _json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def read_records(
    path: str | os.PathLike[str],
    *,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> RecordList:
    """Read a JSON-list or JSONL file into a :class:`RecordList` of dicts.

    JSONL is read line by line with ``readline(max_record_bytes + 2)``, so an over-long line is
    refused after reading at most ``max_record_bytes + 2`` bytes of it (the limit excludes the
    line's ``\\n`` or ``\\r\\n``). A JSON list is parsed whole, so its file size is bounded by
    ``max_file_bytes`` first; each of its records is then bounded by ``max_record_bytes``. A UTF-8
    byte-order mark is skipped.

    Raises :class:`DataError` naming the file and the line, e.g.
    ``train.jsonl line 7: invalid JSON (Expecting ',' delimiter at column 12)`` or
    ``train.json record 3 (line 12): expected a JSON object, found list``, and
    ``train.jsonl: no records`` for a file without any.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            first = _first_significant_byte(f)
            f.seek(0)
            if first == b"[":
                records, locations = _read_json_list(f, path, max_record_bytes, max_file_bytes)
            else:
                records, locations = _read_jsonl(f, path, max_record_bytes)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
    if not records:
        raise DataError(f"{path}: no records")
    return RecordList(records, path=path, locations=locations)


def _first_significant_byte(f: IO[bytes], chunk: int = 1 << 16) -> bytes:
    """The first byte that is not JSON whitespace (after an optional BOM), or ``b""``."""
    start = True
    while True:
        block = f.read(chunk)
        if not block:
            return b""
        if start and block.startswith(_BOM):
            block = block[len(_BOM) :]
        start = False
        stripped = block.lstrip(b" \t\r\n")
        if stripped:
            return stripped[:1]


def _read_jsonl(
    f: IO[bytes], path: Path, max_record_bytes: int
) -> tuple[list[dict[str, Any]], list[str]]:
    records: list[dict[str, Any]] = []
    locations: list[str] = []
    lineno = 0
    while True:
        raw = f.readline(max_record_bytes + 2)  # the line, its \r\n, and no more
        if not raw:
            break
        lineno += 1
        body = raw[:-1] if raw.endswith(b"\n") else raw
        if body.endswith(b"\r") and raw.endswith(b"\n"):
            body = body[:-1]
        if len(body) > max_record_bytes:
            raise DataError(
                f"{path} line {lineno}: line is longer than the limit of {max_record_bytes} bytes"
            )
        if lineno == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path} line {lineno}: not valid UTF-8 (byte {e.start + 1} of the line)"
            ) from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as e:
            hint = ""
            stripped = line.strip()
            if not records and stripped.startswith("{") and not stripped.endswith("}"):
                hint = "; a JSON file must hold a list of objects, JSONL one object per line"
            raise DataError(
                f"{path} line {lineno}: invalid JSON ({e.msg} at column {e.colno}){hint}"
            ) from None
        except RecursionError:
            raise DataError(f"{path} line {lineno}: JSON nested too deeply") from None
        except ValueError as e:  # not a syntax error: e.g. an integer over Python's digit limit
            raise DataError(f"{path} line {lineno}: invalid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise DataError(
                f"{path} line {lineno}: expected a JSON object, found {_json_type(obj)}"
            )
        records.append(obj)
        locations.append(f"line {lineno}")
    return records, locations


def _read_json_list(
    f: IO[bytes], path: Path, max_record_bytes: int, max_file_bytes: int
) -> tuple[list[dict[str, Any]], list[str]]:
    size = os.fstat(f.fileno()).st_size
    if size > max_file_bytes:
        raise DataError(
            f"{path}: file is {size} bytes, over the limit of {max_file_bytes} bytes for a "
            "JSON list (use JSONL, one object per line, for larger data)"
        )
    raw = f.read(size + 1)  # read(n) reserves n bytes up front: ask for what the file holds
    if len(raw) > size:  # the file grew after fstat
        raise DataError(f"{path}: file changed while being read")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path} line {line}: not valid UTF-8 (byte {e.start + 1} of the file)"
        ) from None
    del raw

    def line_col(pos: int) -> tuple[int, int]:
        return text.count("\n", 0, pos) + 1, pos - text.rfind("\n", 0, pos)

    def fail(pos: int, msg: str) -> DataError:
        line, col = line_col(pos)
        return DataError(f"{path} line {line}: invalid JSON ({msg} at column {col})")

    decoder = json.JSONDecoder()
    records: list[dict[str, Any]] = []
    locations: list[str] = []
    last_pos, last_line = 0, 1
    pos = _JSON_WS.match(text, 0).end() + 1  # type: ignore[union-attr]  # after '['
    pos = _JSON_WS.match(text, pos).end()  # type: ignore[union-attr]
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            start = pos
            try:
                obj, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path} line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})"
                ) from None
            except RecursionError:
                raise DataError(
                    f"{path} line {line_col(start)[0]}: JSON nested too deeply"
                ) from None
            except ValueError as e:  # e.g. an integer over Python's digit limit
                raise DataError(f"{path} line {line_col(start)[0]}: invalid JSON ({e})") from None
            last_line += text.count("\n", last_pos, start)
            last_pos = start
            where = f"record {len(records) + 1} (line {last_line})"
            span = end - start
            if 4 * span > max_record_bytes:  # a char is at most 4 UTF-8 bytes
                nbytes = len(text[start:end].encode("utf-8"))
                if nbytes > max_record_bytes:
                    raise DataError(
                        f"{path} {where}: record is {nbytes} bytes, over the limit of "
                        f"{max_record_bytes} bytes"
                    )
            if not isinstance(obj, dict):
                raise DataError(f"{path} {where}: expected a JSON object, found {_json_type(obj)}")
            records.append(obj)
            locations.append(where)
            pos = _JSON_WS.match(text, end).end()  # type: ignore[union-attr]
            if text.startswith(",", pos):
                pos = _JSON_WS.match(text, pos + 1).end()  # type: ignore[union-attr]
                continue
            if text.startswith("]", pos):
                pos += 1
                break
            if pos >= len(text):
                raise fail(pos, "Unterminated list, expecting ',' or ']'")
            raise fail(pos, "Expecting ',' delimiter")
    pos = _JSON_WS.match(text, pos).end()  # type: ignore[union-attr]
    if pos != len(text):
        raise fail(pos, "Extra data after the end of the list")
    return records, locations


# --------------------------------------------------------------------------------------------
# Formats and field validation
# --------------------------------------------------------------------------------------------


def detect_format(
    records: Sequence[Mapping[str, Any]], *, path: str | os.PathLike[str] | None = None
) -> str:
    """The format of ``records``, from the fields of the first record.

    ``instruction`` if it has an ``instruction`` field; ``classification`` if it has ``text``
    and ``label``; ``text`` if it has ``text``. Anything else is a :class:`DataError`.
    """
    loc = _Locator(records, path)
    if not records:
        raise DataError(f"{loc.file()}: no records")
    first = records[0]
    if "instruction" in first:
        return "instruction"
    if "text" in first:
        return "classification" if "label" in first else "text"
    fields = ", ".join(repr(k) for k in list(first)[:8]) or "none"
    raise DataError(
        f"{loc.at(0)}: cannot tell the data format from the fields ({fields}); expected "
        "'instruction' (instruction data) or 'text' (plain text or classification)"
    )


def _resolve_format(
    records: Sequence[Mapping[str, Any]], fmt: str | None, path: str | os.PathLike[str] | None
) -> str:
    if fmt is None:
        return detect_format(records, path=path)
    if fmt not in FORMATS:
        expected = ", ".join(repr(f) for f in FORMATS)
        raise DataError(f"unknown data format {fmt!r} (expected one of {expected})")
    return fmt


def _field_str(
    record: Mapping[str, Any],
    name: str,
    where: str,
    *,
    fmt: str,
    required: bool = True,
    nonempty: bool = False,
) -> str:
    if name not in record:
        if required:
            raise DataError(f"{where}: missing field {name!r} ({fmt} data needs it)")
        return ""
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, found {_json_type(value)}")
    if not value.isascii():  # JSON's "\\ud800" escapes decode to lone surrogates: not text
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(
                f"{where}: field {name!r} is not valid Unicode (lone surrogate at character {e.start + 1})"
            ) from None
    if nonempty and not value.strip():
        raise DataError(f"{where}: field {name!r} is empty")
    return value


def format_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca / LLM-Adapters prompt for one instruction, ending in ``"### Response:\\n"``.

    >>> format_prompt("Add 2 and 3.")[-45:]
    '### Instruction:\\nAdd 2 and 3.\\n\\n### Response:\\n'
    """
    if input:
        return PROMPT_TEMPLATE.format(instruction=instruction, input=input)
    return PROMPT_TEMPLATE_NO_INPUT.format(instruction=instruction)


def _instruction_text(record: Mapping[str, Any], where: str) -> str:
    """Classification / multiple-choice text of an instruction record: instruction [+ \\n input]."""
    instruction = _field_str(record, "instruction", where, fmt="instruction", nonempty=True)
    extra = _field_str(record, "input", where, fmt="instruction", required=False)
    return f"{instruction}\n{extra}" if extra else instruction


def _check_max_length(max_length: object) -> int:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise DataError(f"max_length must be a positive integer, got {max_length!r}")
    return max_length


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildStats:
    """What a builder did.

    ``truncated``: examples cut to ``max_length``. ``no_target``: causal-LM examples whose labels
    are all ``-100`` (the response and its eos were cut away entirely); always 0 for
    classification and multiple choice. ``longest``: the longest example before truncation, in
    tokens (for multiple choice, the longest single (question, option) pair).
    """

    examples: int
    truncated: int
    no_target: int
    longest: int
    max_length: int

    def describe(self) -> str:
        """One line for a log, e.g. ``9427 examples, 3 truncated to 256 tokens (longest 301)``."""
        text = (
            f"{self.examples} examples, {self.truncated} truncated to {self.max_length} tokens "
            f"(longest {self.longest})"
        )
        if self.no_target:
            text += f", {self.no_target} with no target tokens left"
        return text


class Examples(list):  # type: ignore[type-arg]
    """The examples a builder made (a list of dicts), with :class:`BuildStats` in ``stats``."""

    def __init__(self, items: Iterable[dict[str, Any]], stats: BuildStats) -> None:
        super().__init__(items)
        self.stats = stats


# --------------------------------------------------------------------------------------------
# Tokenizer helpers
# --------------------------------------------------------------------------------------------


def _encode_plain(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens and without truncation."""
    if not texts:
        return []
    enc = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)
    return [list(ids) for ids in enc["input_ids"]]


def _special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the tokenizer puts before a single text (``[bos]`` or ``[]``)."""
    probe = "a"
    with_special = list(tokenizer(probe, add_special_tokens=True, verbose=False)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False, verbose=False)["input_ids"])
    n = len(plain)
    for k in range(len(with_special) - n + 1):
        if with_special[k : k + n] == plain:
            return with_special[:k]
    return []


def _encode_truncated(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    pairs: list[str] | None,
    max_length: int,
) -> tuple[dict[str, list[list[int]]], int, int]:
    """Encode (pairs of) texts with special tokens, cut to ``max_length``.

    Returns the encodings (``input_ids``, ``attention_mask`` and ``token_type_ids`` when the
    tokenizer makes them), the number of truncated ones and the longest length before truncation.
    Texts are encoded once in full; only the too-long ones are encoded again with truncation.
    """
    if not texts:
        return {"input_ids": [], "attention_mask": []}, 0, 0
    args: tuple[Any, ...] = (texts,) if pairs is None else (texts, pairs)
    full = tokenizer(*args, truncation=False, verbose=False)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in full]
    out = {k: [list(v) for v in full[k]] for k in keys}
    if "attention_mask" not in out:
        out["attention_mask"] = [[1] * len(ids) for ids in out["input_ids"]]
    lengths = [len(ids) for ids in out["input_ids"]]
    longest = max(lengths)
    long_ix = [i for i, n in enumerate(lengths) if n > max_length]
    if long_ix:
        cut_args: tuple[Any, ...] = ([texts[i] for i in long_ix],)
        if pairs is not None:
            cut_args += ([pairs[i] for i in long_ix],)
        cut = tokenizer(*cut_args, truncation=True, max_length=max_length, verbose=False)
        for j, i in enumerate(long_ix):
            for k in keys:
                out[k][i] = list(cut[k][j])
            if "attention_mask" not in cut:
                out["attention_mask"][i] = [1] * len(out["input_ids"][i])
    return out, len(long_ix), longest


# --------------------------------------------------------------------------------------------
# Causal LM
# --------------------------------------------------------------------------------------------


def build_causal_lm_examples(
    records: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    train_on_prompt: bool = False,
    fmt: str | None = None,
    path: str | os.PathLike[str] | None = None,
) -> Examples:
    """Causal-LM examples (``input_ids``, ``attention_mask``, ``labels``) from records.

    ``instruction`` records become ``prefix + prompt + output + eos`` with the prompt (and the
    tokenizer's prefix, e.g. bos) masked to ``-100`` in ``labels`` unless ``train_on_prompt``;
    ``text`` records become ``prefix + text + eos``, all trained. Examples are cut to
    ``max_length`` keeping the start; see :class:`BuildStats` (``result.stats``) for counts.
    Every record is validated before anything is tokenized. ``path`` names the file in errors
    (default: the :class:`RecordList`'s own path).
    """
    max_length = _check_max_length(max_length)
    loc = _Locator(records, path)
    if not records:
        raise DataError(f"{loc.file()}: no records")
    fmt = _resolve_format(records, fmt, path)
    if fmt == "classification":
        raise DataError(
            f"{loc.at(0)}: classification data has no response to train a causal LM on "
            "(use the instruction or text format, or a classification model)"
        )

    prompts: list[str] = []
    responses: list[str] = []
    for i, record in enumerate(records):
        where = loc.at(i)
        if not isinstance(record, Mapping):
            raise DataError(f"{where}: expected a JSON object, found {_json_type(record)}")
        if fmt == "instruction":
            instruction = _field_str(record, "instruction", where, fmt=fmt, nonempty=True)
            extra = _field_str(record, "input", where, fmt=fmt, required=False)
            responses.append(_field_str(record, "output", where, fmt=fmt))
            prompts.append(format_prompt(instruction, extra))
        else:
            responses.append(_field_str(record, "text", where, fmt=fmt, nonempty=True))
            prompts.append("")

    eos = tokenizer.eos_token_id
    if eos is None:
        raise ModelError(
            "tokenizer has no eos token; causal-LM examples end with it (set eos_token)"
        )
    prefix = _special_prefix(tokenizer)
    prompt_ids = _encode_plain(tokenizer, prompts)
    response_ids = _encode_plain(tokenizer, responses)

    examples: list[dict[str, Any]] = []
    truncated = no_target = longest = 0
    for p_ids, r_ids in zip(prompt_ids, response_ids, strict=True):
        ids = prefix + p_ids + r_ids + [eos]
        labels = list(ids)
        if fmt == "instruction" and not train_on_prompt:
            n_prompt = len(prefix) + len(p_ids)
            labels[:n_prompt] = [IGNORE_INDEX] * n_prompt
        longest = max(longest, len(ids))
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            no_target += 1
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    stats = BuildStats(len(examples), truncated, no_target, longest, max_length)
    return Examples(examples, stats)


# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------


def _raw_label(record: Mapping[str, Any], field: str, where: str) -> int | str:
    if field not in record:
        raise DataError(f"{where}: missing label field {field!r}")
    value = record[field]
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: label field {field!r} is empty")
        return _field_str(record, field, where, fmt="classification")  # the Unicode check
    raise DataError(
        f"{where}: label field {field!r} must be an integer or a string, found {_json_type(value)}"
    )


def _map_labels(
    raw: list[int | str],
    loc: _Locator,
    num_labels: int | None,
    label_names: Sequence[str] | None,
) -> tuple[list[int], list[str]]:
    """Label ids and names in id order; see the module docstring for the rules."""
    if label_names is not None:
        names = list(label_names)
        index = {name: i for i, name in enumerate(names)}
        expected = ", ".join(repr(n) for n in names)
        ids: list[int] = []
        for i, value in enumerate(raw):
            if isinstance(value, str):
                if value not in index:
                    raise DataError(
                        f"{loc.at(i)}: unknown label {value!r} (expected one of {expected})"
                    )
                ids.append(index[value])
            else:
                if not 0 <= value < len(names):
                    raise DataError(
                        f"{loc.at(i)}: label {value} is outside range({len(names)}) "
                        f"({len(names)} label names)"
                    )
                ids.append(value)
        return ids, names

    first_is_str = isinstance(raw[0], str)
    for i, value in enumerate(raw):
        if isinstance(value, str) != first_is_str:
            kind, first_kind = (
                ("an integer", "a string") if first_is_str else ("a string", "an integer")
            )
            raise DataError(
                f"{loc.at(i)}: label {value!r} is {kind} but the first record's label is "
                f"{first_kind}; use one kind, or pass label names"
            )

    if not first_is_str:
        int_ids = [int(v) for v in raw]
        for i, value in enumerate(int_ids):
            if value < 0:
                raise DataError(f"{loc.at(i)}: label {value} is negative")
            if num_labels is not None and value >= num_labels:
                raise DataError(
                    f"{loc.at(i)}: label {value} is outside range({num_labels}) "
                    f"(num_labels={num_labels})"
                )
            if num_labels is None and value >= MAX_INFERRED_LABELS:
                raise DataError(
                    f"{loc.at(i)}: label {value} would make {value + 1} classes (more than "
                    f"{MAX_INFERRED_LABELS} are not inferred from the data); pass the number of labels"
                )
        n = num_labels if num_labels is not None else max(int_ids) + 1
        return int_ids, [f"LABEL_{k}" for k in range(n)]

    strings = [str(v) for v in raw]
    unique = set(strings)
    names = ["false", "true"] if unique <= {"false", "true"} else sorted(unique)
    index = {name: k for k, name in enumerate(names)}
    str_ids = [index[s] for s in strings]
    if num_labels is not None:
        for i, (value, label_id) in enumerate(zip(strings, str_ids, strict=True)):
            if label_id >= num_labels:
                raise DataError(
                    f"{loc.at(i)}: label {value!r} gets id {label_id} (labels sorted: "
                    f"{len(names)} distinct), outside range({num_labels}) "
                    f"(num_labels={num_labels}); pass label names to fix the mapping"
                )
        names += [f"LABEL_{k}" for k in range(len(names), num_labels)]
    return str_ids, names


def build_classification_examples(
    records: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    label_field: str,
    text_field: str | None = None,
    num_labels: int | None = None,
    label_names: Sequence[str] | None = None,
    path: str | os.PathLike[str] | None = None,
) -> tuple[Examples, list[str]]:
    """Sequence-classification examples and the label names in id order.

    Each example has ``input_ids``, ``attention_mask``, ``token_type_ids`` (if the tokenizer
    makes them) and ``label`` (int). The text is ``record[text_field]``; with no ``text_field``
    it is ``instruction`` (+ ``"\\n"`` + ``input`` if non-empty) for instruction records and
    ``text`` otherwise. Labels follow the rules in the module docstring; a label outside
    ``range(num_labels)`` or a string not in ``label_names`` is a :class:`DataError` naming the
    file and line. Texts are encoded with the tokenizer's special tokens and cut to
    ``max_length``.
    """
    max_length = _check_max_length(max_length)
    if num_labels is not None and (
        isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1
    ):
        raise DataError(f"num_labels must be a positive integer, got {num_labels!r}")
    if label_names is not None:
        label_names = list(label_names)
        if not label_names or not all(isinstance(n, str) and n for n in label_names):
            raise DataError("label names must be non-empty strings")
        if len(set(label_names)) != len(label_names):
            raise DataError(f"label names repeat a name: {label_names}")
        if num_labels is not None and num_labels != len(label_names):
            raise DataError(f"num_labels={num_labels} but {len(label_names)} label names given")
    loc = _Locator(records, path)
    if not records:
        raise DataError(f"{loc.file()}: no records")

    from_instruction = text_field is None and "instruction" in records[0]
    field = text_field if text_field is not None else "text"
    texts: list[str] = []
    raw_labels: list[int | str] = []
    for i, record in enumerate(records):
        where = loc.at(i)
        if not isinstance(record, Mapping):
            raise DataError(f"{where}: expected a JSON object, found {_json_type(record)}")
        if from_instruction:
            texts.append(_instruction_text(record, where))
        else:
            texts.append(_field_str(record, field, where, fmt="classification", nonempty=True))
        raw_labels.append(_raw_label(record, label_field, where))
    label_ids, names = _map_labels(raw_labels, loc, num_labels, label_names)

    enc, truncated, longest = _encode_truncated(tokenizer, texts, None, max_length)
    examples = []
    for i, label in enumerate(label_ids):
        example = {k: v[i] for k, v in enc.items()}
        example["label"] = label
        examples.append(example)
    stats = BuildStats(len(examples), truncated, 0, longest, max_length)
    return Examples(examples, stats), names


# --------------------------------------------------------------------------------------------
# Multiple choice (ARC)
# --------------------------------------------------------------------------------------------


def parse_arc_choices(instruction: str) -> tuple[str, list[str]]:
    """Split an LLM-Adapters ARC instruction into the question and its options.

    The instruction looks like (options on one line, 3 to 5 of them in ARC-Easy)::

        Please choose the correct answer to the question: Which gas do we breathe?

        Answer1: nitrogen Answer2: oxygen Answer3: helium

        Answer format: answer1/answer2/answer3

    >>> parse_arc_choices("Please choose the correct answer to the question: Which gas?\\n\\n"
    ...                   "Answer1: nitrogen Answer2: oxygen\\n\\nAnswer format: answer1/answer2")
    ('Which gas?', ['nitrogen', 'oxygen'])

    The boilerplate prefix and the ``Answer format`` line are dropped. Raises
    :class:`DataError` (without a file name; the builder adds it) when there is no question,
    fewer than two options, an empty option, options not numbered 1, 2, 3, ..., or an
    ``Answer format`` line that lists a different number of options.
    """
    if not isinstance(instruction, str):
        raise DataError(f"instruction must be a string, found {_json_type(instruction)}")
    first = re.search(r"(?:^|\s)Answer1:\s", instruction)
    if first is None:
        raise DataError("no 'Answer1:' option found in the instruction")
    question = instruction[: first.start()].strip()
    if question.startswith(_ARC_PREFIX):
        question = question[len(_ARC_PREFIX) :].strip()
    if not question:
        raise DataError("no question before 'Answer1:'")

    body = instruction[first.end() :]
    fmt_line = re.search(r"\n\s*Answer format:([^\n]*)", body)
    listed: int | None = None
    if fmt_line is not None:
        listed = len(re.findall(r"answer\d+", fmt_line.group(1), flags=re.IGNORECASE))
        body = body[: fmt_line.start()]

    options: list[str] = []
    pos = 0
    while True:
        k = len(options) + 1
        nxt = re.compile(rf"\sAnswer{k + 1}:\s").search(body, pos)
        option = (body[pos : nxt.start()] if nxt else body[pos:]).strip()
        if not option:
            raise DataError(f"option {k} is empty")
        options.append(option)
        if nxt is None:
            break
        pos = nxt.end()

    for k, option in enumerate(options, start=1):
        stray = re.search(r"\bAnswer(\d+):", option)
        if stray:
            raise DataError(
                f"option {k} contains 'Answer{stray.group(1)}:'; options must be numbered "
                "Answer1, Answer2, ... in order"
            )
    if len(options) < 2:
        raise DataError("found only 1 option ('Answer1:'); need at least 2")
    if listed is not None and listed != len(options):
        raise DataError(f"'Answer format' lists {listed} options but {len(options)} were found")
    return question, options


def build_multiple_choice_examples(
    records: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    path: str | os.PathLike[str] | None = None,
) -> Examples:
    """Multiple-choice examples from ARC-style instruction records (``instruction``, ``answer``).

    Each example holds one encoding of the pair (question, option) per option, as lists of
    lists under ``input_ids``, ``attention_mask`` (and ``token_type_ids``), and ``label``, the
    0-based index of the right option from ``answer`` = ``"answerN"`` (N from 1). A non-empty
    ``input`` is appended to the question after a newline. Pairs are cut to ``max_length``
    (longest first). The number of options may vary between records; :func:`collate` pads it.
    """
    max_length = _check_max_length(max_length)
    loc = _Locator(records, path)
    if not records:
        raise DataError(f"{loc.file()}: no records")
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    if max_length <= specials:
        raise DataError(
            f"max_length={max_length} leaves no room for text (the tokenizer adds {specials} "
            "special tokens to a pair)"
        )

    questions: list[str] = []
    options_flat: list[str] = []
    counts: list[int] = []
    labels: list[int] = []
    for i, record in enumerate(records):
        where = loc.at(i)
        if not isinstance(record, Mapping):
            raise DataError(f"{where}: expected a JSON object, found {_json_type(record)}")
        instruction = _field_str(record, "instruction", where, fmt="multiple-choice")
        extra = _field_str(record, "input", where, fmt="multiple-choice", required=False)
        answer = _field_str(record, "answer", where, fmt="multiple-choice")
        try:
            question, options = parse_arc_choices(instruction)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        if extra:
            question = f"{question}\n{extra}"
        match = re.fullmatch(r"answer(\d+)", answer.strip(), flags=re.IGNORECASE)
        if match is None:
            raise DataError(f"{where}: answer {answer!r} is not of the form 'answerN'")
        n = int(match.group(1))
        if not 1 <= n <= len(options):
            raise DataError(
                f"{where}: answer {answer!r} but the question has {len(options)} options"
            )
        questions.extend([question] * len(options))
        options_flat.extend(options)
        counts.append(len(options))
        labels.append(n - 1)

    enc, truncated, longest = _encode_truncated(tokenizer, questions, options_flat, max_length)
    examples = []
    start = 0
    for count, label in zip(counts, labels, strict=True):
        example: dict[str, Any] = {k: v[start : start + count] for k, v in enc.items()}
        example["label"] = label
        examples.append(example)
        start += count
    stats = BuildStats(len(examples), truncated, 0, longest, max_length)
    return Examples(examples, stats)


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def _pad(rows: Sequence[Sequence[int]], length: int, value: int) -> list[list[int]]:
    return [list(r) + [value] * (length - len(r)) for r in rows]


def _round_up(n: int, multiple: int | None) -> int:
    if multiple is None or multiple <= 1:
        return n
    return -(-n // multiple) * multiple


def _example_kind(example: Mapping[str, Any]) -> str:
    ids = example["input_ids"]
    if ids and isinstance(ids[0], (list, tuple)):
        return "multiple choice"
    if "labels" in example:
        return "causal LM"
    if "label" in example:
        return "classification"
    return "unlabelled"


def collate(
    examples: Sequence[Mapping[str, Any]],
    pad_token_id: int,
    *,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad a list of builder examples into ``torch.long`` tensors (``choice_mask``: bool).

    - causal LM (examples with ``labels``): ``input_ids``/``attention_mask``/``labels``
      ``[batch, seq]``, padded with ``pad_token_id`` / 0 / ``-100``;
    - classification (examples with ``label``): ``input_ids``, ``attention_mask``,
      (``token_type_ids``) ``[batch, seq]`` and ``labels`` ``[batch]``;
    - multiple choice (``input_ids`` a list of lists): ``[batch, num_choices, seq]`` tensors with
      ``num_choices`` the largest in the batch, ``labels`` ``[batch]`` and ``choice_mask``
      ``[batch, num_choices]`` (False for a padded choice). A padded choice repeats the
      example's first option, so no row is all padding (an all-masked attention row can give
      NaN); the training loop must set the logits where ``choice_mask`` is False to ``-inf``
      and must not pass ``choice_mask`` to the model.

    Examples with neither ``labels`` nor ``label`` give a batch without ``labels``.
    ``token_type_ids`` is padded with 0. ``seq`` is rounded up to ``pad_to_multiple_of``.
    Misuse (no examples, mixed kinds, a non-int ``pad_token_id``) is a ``ValueError``: it is a
    programming error, not bad data.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
        raise ValueError(f"pad_token_id must be an int, got {pad_token_id!r}")
    kind = _example_kind(examples[0])
    for ex in examples:
        ex_kind = _example_kind(ex)
        if ex_kind != kind:
            raise ValueError(f"collate got a mix of example kinds ({kind} and {ex_kind})")
    has_tt = "token_type_ids" in examples[0]
    pad_values = {"input_ids": pad_token_id, "attention_mask": 0, "token_type_ids": 0}

    if kind == "multiple choice":
        num_choices = max(len(ex["input_ids"]) for ex in examples)
        seq = _round_up(max(len(r) for ex in examples for r in ex["input_ids"]), pad_to_multiple_of)
        keys = ["input_ids", "attention_mask"] + (["token_type_ids"] if has_tt else [])
        batch: dict[str, list[Any]] = {k: [] for k in keys}
        choice_mask = []
        for ex in examples:
            n = len(ex["input_ids"])
            if n == 0:
                raise ValueError("a multiple-choice example has no options")
            choice_mask.append([True] * n + [False] * (num_choices - n))
            for k in keys:
                rows = list(ex[k]) + [ex[k][0]] * (num_choices - n)
                batch[k].append(_pad(rows, seq, pad_values[k]))
        out = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        out["labels"] = torch.tensor([int(ex["label"]) for ex in examples], dtype=torch.long)
        out["choice_mask"] = torch.tensor(choice_mask, dtype=torch.bool)
        return out

    seq = _round_up(max(len(ex["input_ids"]) for ex in examples), pad_to_multiple_of)
    out = {
        "input_ids": torch.tensor(
            _pad([ex["input_ids"] for ex in examples], seq, pad_token_id), dtype=torch.long
        ),
        "attention_mask": torch.tensor(
            _pad([ex["attention_mask"] for ex in examples], seq, 0), dtype=torch.long
        ),
    }
    if has_tt:
        out["token_type_ids"] = torch.tensor(
            _pad([ex["token_type_ids"] for ex in examples], seq, 0), dtype=torch.long
        )
    if kind == "causal LM":
        out["labels"] = torch.tensor(
            _pad([ex["labels"] for ex in examples], seq, IGNORE_INDEX), dtype=torch.long
        )
    elif kind == "classification":
        out["labels"] = torch.tensor([int(ex["label"]) for ex in examples], dtype=torch.long)
    return out
