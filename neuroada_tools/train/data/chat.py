"""Conversations: TRL's conversational and prompt-completion records, rendered with the chat template.

What this file does
-------------------
Every causal-LM record becomes a :class:`Turns`, the one shape both training
(``examples.build_causal_lm_examples``) and evaluation (:func:`render_prompt`) render, so a prompt is
tokenized the same way in both:

- *plain* turns (a prompt text and a response text): Alpaca instruction records
  (``format_prompt(instruction, input)`` + ``output``), standard prompt-completion records
  (``prompt`` + ``completion``, both strings) and text records (no prompt). The ids are
  ``prefix + ids(prompt) + ids(response) + [eos]``, as ``examples.py`` describes.
- *chat* turns (a list of ``{"role", "content"}`` messages and the message ranges trained on):
  conversational records (``messages``; every assistant turn is a target), conversational
  prompt-completion records (``prompt`` and ``completion`` message lists; the completion is the
  target, as TRL trains it) and instruction records under ``template="chat"`` (a user turn of
  ``instruction`` + ``"\\n\\n"`` + ``input`` when the input is non-empty, then an assistant turn
  of ``output``). The ids are exactly ``tokenizer.apply_chat_template(messages)``: no eos is
  added, the template writes its own end-of-turn tokens.

Finding the target tokens (the prefix property)
-----------------------------------------------
Most chat templates (SmolLM2's, Llama 3's) have no ``{% generation %}`` markers, so
``return_assistant_tokens_mask`` cannot be used. Instead, for a target range of messages ``[i, j)``
the prompt ``render(messages[:i], add_generation_prompt=True)`` and the turn
``render(messages[:j])`` are tokenized as well, and both must be token-for-token prefixes of the
whole conversation's ids; the target is the tokens between their ends. Worked example (SmolLM2,
user "Hi", assistant "Hello!")::

    whole   <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n
    prompt  <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n
    target                                               Hello!<|im_end|>\\n

(SmolLM2's template also puts a default system turn first, in all three.) The target ends after
the template's end-of-turn tokens, so the model learns to stop.

A template for which a prefix is not a prefix (one that renders the last message differently, or
drops earlier reasoning) is refused with a :class:`ModelError` naming the record, never trained on
with a wrong mask.

What this file leaves out
-------------------------
Tool calls and the ``tool`` role, multimodal content (a list of parts), and templates' extra keyword
arguments (``enable_thinking``); only ``role`` and ``content`` of a message reach the template.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from neuroada_tools.errors import DataError, ModelError
from neuroada_tools.train.data.prompts import (
    TEMPLATES,
    _check_text,
    _field_str,
    _resolve_format,
    format_prompt,
)
from neuroada_tools.train.data.records import _json_type, _Locator

if TYPE_CHECKING:  # pragma: no cover - typing only; importing transformers is slow
    from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")
"""Message roles accepted in conversational data."""


# --------------------------------------------------------------------------------------------
# One record -> Turns
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Turns:
    """A causal-LM record in the shape training and evaluation both render (module docstring).

    Plain: ``prompt`` and ``response`` texts (``messages`` empty). Chat: ``messages`` and
    ``targets``, the message ranges ``[i, j)`` trained on, in order. ``strict``: a record whose
    target is cut away entirely by ``max_length`` is an error, not a skipped example (the
    Alpaca and text formats keep their documented skip).
    """

    where: str
    prompt: str = ""
    response: str = ""
    messages: tuple[dict[str, str], ...] = ()
    targets: tuple[tuple[int, int], ...] = ()
    masked: bool = True
    strict: bool = True

    @property
    def chat(self) -> bool:
        return bool(self.messages)


def _messages(value: object, where: str, field: str) -> list[dict[str, str]]:
    """Validated ``{"role", "content"}`` dicts of a message list (only those two keys kept)."""
    if not isinstance(value, list):
        raise DataError(f"{where}: field {field!r} must be a list of messages, found {_json_type(value)}")
    if not value:
        raise DataError(f"{where}: field {field!r} holds no messages")
    out = []
    for n, message in enumerate(value, start=1):
        at = f"{where}: {field} message {n}"
        if not isinstance(message, Mapping):
            raise DataError(f"{at}: expected an object with 'role' and 'content', found {_json_type(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise DataError(f"{at}: missing {key!r}")
        role, content = message["role"], message["content"]
        if not isinstance(role, str) or role not in ROLES:
            shown = repr(role) if isinstance(role, str) else _json_type(role)
            raise DataError(f"{at}: unknown role {shown} (expected 'system', 'user' or 'assistant')")
        if not isinstance(content, str):
            raise DataError(f"{at}: 'content' must be a string, found {_json_type(content)}")
        _check_text(content, f"{at}: 'content'")
        out.append({"role": role, "content": content})
    return out


def record_turns(
    record: Mapping[str, Any], fmt: str, where: str, *, template: str = "alpaca"
) -> Turns:
    """The :class:`Turns` of one validated record of format ``fmt`` (see ``prompts.FORMATS``).

    Raises :class:`DataError` starting with ``where`` for a bad record. Example::

        record_turns({"messages": [{"role": "user", "content": "Hi"},
                                   {"role": "assistant", "content": "Hello!"}]},
                     "conversational", "train.jsonl line 1").targets  ->  ((1, 2),)
    """
    if template not in TEMPLATES:
        raise DataError(f"unknown template {template!r} (expected one of {', '.join(map(repr, TEMPLATES))})")
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object, found {_json_type(record)}")
    if fmt == "instruction":
        instruction = _field_str(record, "instruction", where, fmt=fmt, nonempty=True)
        extra = _field_str(record, "input", where, fmt=fmt, required=False)
        output = _field_str(record, "output", where, fmt=fmt)
        if template == "alpaca":
            return Turns(where, prompt=format_prompt(instruction, extra), response=output, strict=False)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        messages = ({"role": "user", "content": user}, {"role": "assistant", "content": output})
        return Turns(where, messages=messages, targets=((1, 2),))
    if fmt == "text":
        text = _field_str(record, "text", where, fmt=fmt, nonempty=True)
        return Turns(where, response=text, masked=False, strict=False)
    if fmt == "conversational":
        if "messages" not in record:
            raise DataError(f"{where}: missing field 'messages' (conversational data needs it)")
        messages = _messages(record["messages"], where, "messages")
        if messages[0]["role"] == "assistant":
            raise DataError(f"{where}: messages message 1 is an assistant turn with nothing before it")
        targets = tuple((i, i + 1) for i, m in enumerate(messages) if m["role"] == "assistant")
        if not targets:
            raise DataError(f"{where}: no assistant turn (the loss is on the assistant turns)")
        return Turns(where, messages=tuple(messages), targets=targets)
    if fmt == "prompt-completion":
        for key in ("prompt", "completion"):
            if key not in record:
                raise DataError(f"{where}: missing field {key!r} (prompt-completion data needs it)")
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return Turns(
                where,
                prompt=_field_str(record, "prompt", where, fmt=fmt, nonempty=True),
                response=_field_str(record, "completion", where, fmt=fmt),
            )
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            raise DataError(
                f"{where}: 'prompt' is {_json_type(prompt)} and 'completion' {_json_type(completion)}; "
                "both must be strings or both lists of messages"
            )
        head = _messages(prompt, where, "prompt")
        tail = _messages(completion, where, "completion")
        if not any(m["role"] == "assistant" for m in tail):
            raise DataError(f"{where}: no assistant turn in 'completion' (the loss is on the completion)")
        return Turns(where, messages=tuple(head + tail), targets=((len(head), len(head) + len(tail)),))
    raise DataError(f"{where}: {fmt} data has no response to train a causal LM on")


def records_turns(
    records: Sequence[Mapping[str, Any]],
    *,
    fmt: str | None = None,
    template: str = "alpaca",
    path: str | os.PathLike[str] | None = None,
) -> list[Turns]:
    """:func:`record_turns` of every record (format detected from the first one unless ``fmt``)."""
    loc = _Locator(records, path)
    if not records:
        raise DataError(f"{loc.file()}: no records")
    fmt = _resolve_format(records, fmt, path)
    if fmt == "classification":
        raise DataError(
            f"{loc.at(0)}: classification data has no response to train a causal LM on "
            "(use the instruction or text format, or a classification model)"
        )
    return [record_turns(r, fmt, loc.at(i), template=template) for i, r in enumerate(records)]


# --------------------------------------------------------------------------------------------
# Rendering chat turns
# --------------------------------------------------------------------------------------------


def check_chat_template(tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """``ModelError`` starting with ``where`` when the tokenizer has no chat template."""
    try:
        tokenizer.get_chat_template()
    except (ValueError, AttributeError):
        raise ModelError(
            f"{where}: this record is rendered with the tokenizer's chat template, and the tokenizer has "
            "none (set chat_template in its tokenizer_config.json, or use instruction data with --template alpaca)"
        ) from None


def _render(tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict[str, str]]],
            generation_prompt: bool, where: str) -> list[list[int]]:
    """``apply_chat_template`` token ids of each conversation; a template error is a DataError."""
    from jinja2 import TemplateError

    try:
        out = tokenizer.apply_chat_template(
            conversations, add_generation_prompt=generation_prompt, tokenize=True, return_dict=False
        )
    except (TemplateError, ValueError, TypeError, KeyError, IndexError) as e:
        raise DataError(f"{where}: the chat template refused the conversation ({type(e).__name__}: {e})") from None
    return [[int(t) for t in ids] for ids in out]


def chat_ids(tokenizer: PreTrainedTokenizerBase, turns: Turns) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of a chat :class:`Turns` and its target spans ``[start, end)`` in those ids.

    The ids are ``apply_chat_template(messages)``; each span comes from the prefix property
    (module docstring). A template that breaks it is a :class:`ModelError` naming the record.
    """
    check_chat_template(tokenizer, turns.where)
    messages = [dict(m) for m in turns.messages]
    (full,) = _render(tokenizer, [messages], False, turns.where)
    prompts = _render(tokenizer, [messages[:i] for i, _ in turns.targets], True, turns.where)
    ends = _render(tokenizer, [messages[:j] for _, j in turns.targets], False, turns.where)
    spans = []
    for (i, j), p, e in zip(turns.targets, prompts, ends, strict=True):
        for part, what in ((p, f"messages[:{i}] with the generation prompt"), (e, f"messages[:{j}]")):
            if full[: len(part)] != part:
                raise ModelError(
                    f"{turns.where}: the chat template renders {what} as something other than a prefix of "
                    "the whole conversation, so the target tokens cannot be found; this template cannot be "
                    "used for training (pass a template whose earlier turns render the same whatever follows)"
                )
        spans.append((len(p), max(len(p), len(e))))
    return full, spans


# --------------------------------------------------------------------------------------------
# Prompts for evaluation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderedPrompt:
    """What a model sees before the reference answer, and that answer.

    ``prompt_ids``: the token ids training puts before the (last) target, special tokens
    included. ``reference``: the last assistant turn (conversational), the completion
    (prompt-completion; with message lists, its last assistant turn) or the ``output``
    (instruction). ``where``: the record's file and line, for messages.
    """

    prompt_ids: list[int]
    reference: str
    where: str


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


def prompt_of(tokenizer: PreTrainedTokenizerBase, turns: Turns) -> RenderedPrompt:
    """The :class:`RenderedPrompt` of one :class:`Turns` (see :func:`render_prompts`)."""
    if not turns.chat:
        if not turns.masked:
            raise DataError(f"{turns.where}: text data has no prompt and no reference answer")
        ids = _special_prefix(tokenizer) + list(
            tokenizer(turns.prompt, add_special_tokens=False, verbose=False)["input_ids"]
        )
        return RenderedPrompt(ids, turns.response, turns.where)
    check_chat_template(tokenizer, turns.where)
    last = max(k for k, m in enumerate(turns.messages) if m["role"] == "assistant")
    (ids,) = _render(tokenizer, [[dict(m) for m in turns.messages[:last]]], True, turns.where)
    return RenderedPrompt(ids, turns.messages[last]["content"], turns.where)


def render_prompts(
    records: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    fmt: str | None = None,
    template: str = "alpaca",
    path: str | os.PathLike[str] | None = None,
) -> list[RenderedPrompt]:
    """The prompt ids and reference answer of every record, rendered exactly as training renders them.

    Every record is validated first (a :class:`DataError` naming the file and line). For an
    instruction record under ``template="alpaca"`` the prompt is ``prefix +
    ids(format_prompt(instruction, input))`` and the reference its ``output``; for a chat record
    (conversational, prompt-completion with message lists, instruction under ``template="chat"``)
    the prompt is ``apply_chat_template(messages before the last assistant turn,
    add_generation_prompt=True)`` and the reference that turn's content. Training's ids for the
    same record start with ``prompt_ids`` (tested), so an evaluation that generates from them
    sees what training saw. Text records have no prompt: a :class:`DataError`. Example::

        render_prompts([{"prompt": "2+2=", "completion": " 4"}], tok)
          -> [RenderedPrompt(prompt_ids=prefix + ids("2+2="), reference=" 4", where="record 1")]
        render_prompts([{"messages": [user "Hi", assistant "Hello!", user "Bye", assistant "Bye!"]}], tok)
          -> [RenderedPrompt(prompt_ids=apply_chat_template(first three messages, add_generation_prompt=True),
                             reference="Bye!", where="record 1")]
    """
    return [prompt_of(tokenizer, t) for t in records_turns(records, fmt=fmt, template=template, path=path)]
