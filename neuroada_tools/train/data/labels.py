"""Classification examples: text and label, with the label names in id order."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from neuroada_tools.errors import DataError
from neuroada_tools.train.data.examples import BuildStats, Examples, _encode_truncated
from neuroada_tools.train.data.prompts import _check_max_length, _field_str, _instruction_text
from neuroada_tools.train.data.records import _json_type, _Locator

if TYPE_CHECKING:  # pragma: no cover - typing only; importing transformers is slow
    from transformers import PreTrainedTokenizerBase

MAX_INFERRED_LABELS = 100_000
"""Largest class count inferred from integer labels (``max + 1``) without ``num_labels``: a stray
``1e12`` label would otherwise build a billion label names."""


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
