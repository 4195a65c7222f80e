"""Record formats, field validation and the prompt template (LLM-Adapters / Alpaca)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from neuroada_tools.errors import DataError
from neuroada_tools.train.data.records import _json_type, _Locator

if TYPE_CHECKING:  # pragma: no cover - typing only; importing transformers is slow
    pass

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

FORMATS = ("instruction", "text", "classification", "conversational", "prompt-completion")
"""Record formats understood by the builders (``conversational`` and ``prompt-completion`` as TRL
defines them: ``{"messages": [...]}`` and ``{"prompt": ..., "completion": ...}``)."""

TEMPLATES = ("alpaca", "chat")
"""How instruction records become a causal-LM prompt: the Alpaca / LLM-Adapters text (the paper's),
or a user turn and an assistant turn rendered with the tokenizer's chat template (``chat.py``)."""


# --------------------------------------------------------------------------------------------
# Formats and field validation
# --------------------------------------------------------------------------------------------


def detect_format(
    records: Sequence[Mapping[str, Any]], *, path: str | os.PathLike[str] | None = None
) -> str:
    """The format of ``records``, from the fields of the first record.

    ``instruction`` if it has an ``instruction`` field; ``classification`` if it has ``text``
    and ``label``; ``text`` if it has ``text``; ``conversational`` if it has ``messages``;
    ``prompt-completion`` if it has ``prompt`` and ``completion``. Anything else (a prompt without
    a completion included) is a :class:`DataError`.
    """
    loc = _Locator(records, path)
    if not records:
        raise DataError(f"{loc.file()}: no records")
    first = records[0]
    if "instruction" in first:
        return "instruction"
    if "text" in first:
        return "classification" if "label" in first else "text"
    if "messages" in first:
        return "conversational"
    if "prompt" in first:
        if "completion" in first:
            return "prompt-completion"
        raise DataError(
            f"{loc.at(0)}: a 'prompt' without a 'completion' has nothing to train on (prompt-completion "
            "data needs both)"
        )
    fields = ", ".join(repr(k) for k in list(first)[:8]) or "none"
    raise DataError(
        f"{loc.at(0)}: cannot tell the data format from the fields ({fields}); expected "
        "'instruction' (instruction data), 'text' (plain text or classification), 'messages' "
        "(conversational) or 'prompt' and 'completion'"
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
    _check_text(value, f"{where}: field {name!r}")
    if nonempty and not value.strip():
        raise DataError(f"{where}: field {name!r} is empty")
    return value


def _check_text(value: str, what: str) -> None:
    """DataError ``"<what> is not valid Unicode ..."`` for a string holding a lone surrogate."""
    if not value.isascii():  # JSON's "\\ud800" escapes decode to lone surrogates: not text
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"{what} is not valid Unicode (lone surrogate at character {e.start + 1})") from None


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
