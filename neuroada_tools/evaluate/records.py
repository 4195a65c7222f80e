"""Evaluation records: what a data record is (its *kind*), its rendered prompt and its reference.

A data file is read by ``train.data.read_records`` (JSON list or JSONL, every record knowing its file
and line) and every record becomes an ``Item`` before any model is loaded, so a bad record is one
line naming the file and the line. The kind of each record is the first entry of ``RECORD_KINDS``
whose ``matches`` accepts it; its ``to_item`` renders the prompt and returns the reference:

* ``instruction`` (LLM-Adapters / Alpaca: ``instruction``, optional ``input``, ``output``, optional
  ``answer``): the prompt is ``train.data.format_prompt(instruction, input)``, exactly what
  train-sparse trains on; the reference is ``answer`` when given, else ``output``. Multiple-choice
  options come from the instruction's ``Answer1: ... Answer2: ...`` (``train.data.parse_arc_choices``,
  the right one from ``answer = "answerN"``), or, failing that, from an ``Answer format: a/b`` line
  whose names are the options themselves (BoolQ: ``true`` / ``false``).
* ``choices`` (``question`` or ``instruction``, a list ``options`` or ``choices`` -- or lm-eval's
  ``{"text": [...], "label": [...]}`` -- and ``answer`` / ``label`` / ``answerKey``: a 0-based index, a
  label of the list, a letter A, B, ... or the option text itself): the prompt renders the question
  as the instruction.
* ``classification`` (``text`` and ``label``, train-sparse's classification data): scored by the
  argmax of a classifier's head; the label is mapped to an id by the model's label names.

* ``chat`` (TRL's formats, as train-sparse reads them: conversational ``{"messages": [...]}``, whose
  reference is the last assistant turn, and prompt-completion ``{"prompt", "completion"}``, whose
  reference is the completion): the prompt ids are ``train.data.chat.render_prompts``' -- the chat
  template applied to the turns before the reference with the generation prompt, or ``prefix +
  ids(prompt)`` for a string prompt -- exactly what training puts before its target.

Under ``--template chat`` an instruction (or ``choices``) record is a user turn rendered with the
tokenizer's chat template, as ``train-sparse --template chat`` renders it. Prompts that need the
tokenizer carry their ids (``Item.prompt_ids``; ``Item.prompt`` is then their decoded text, for the
predictions file). ``to_item(record, where, prompting)`` gets a ``Prompting``: the template name and
``tokenizer()``, which loads the tokenizer on first call (the Alpaca template never calls it). More
kinds plug in through ``register_kind``, which puts a new kind before ``classification``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from neuroada_tools.errors import DataError
from neuroada_tools.train.data import format_prompt, parse_arc_choices
from neuroada_tools.train.data.records import RecordList, _json_type, _Locator

TEMPLATES = ("alpaca", "chat")
"""Prompt templates, as train-sparse's ``--template``: ``alpaca`` (LLM-Adapters), ``chat`` (the tokenizer's)."""


@dataclass
class Item:
    """One record ready to score. ``where``: file and line. ``prompt``: the rendered prompt.
    ``reference``: the answer to compare with. ``options`` / ``gold``: the option texts and the index of
    the right one (multiple choice), ``question``: the question alone (lm-eval's prompt). ``text`` /
    ``label``: a classification record's text and raw label."""

    where: str
    prompt: str
    reference: str
    kind: str
    options: list[str] | None = None
    gold: int | None = None
    question: str | None = None
    text: str | None = None
    label: int | str | None = None
    prompt_ids: list[int] | None = None  # the prompt's token ids where the tokenizer rendered it (chat)


@dataclass(frozen=True)
class Prompting:
    """How prompts are rendered: the template's name and ``tokenizer()``, the tokenizer loaded on first call."""

    template: str = "alpaca"
    tokenizer: Callable[[], object] | None = None


@dataclass(frozen=True)
class RecordKind:
    name: str
    matches: Callable[[Mapping], bool]
    to_item: Callable[[Mapping, str, Prompting], Item]  # (record, where, prompting) -> Item


def render(prompting: Prompting, instruction: str, input: str = "") -> str:
    """The prompt train-sparse renders for an instruction under the Alpaca template (``chat``: ``_rendered``)."""
    if prompting.template not in TEMPLATES:
        raise DataError(f"unknown template {prompting.template!r} (expected one of {', '.join(TEMPLATES)})")
    return format_prompt(instruction, input)


def _rendered(record: Mapping, where: str, prompting: Prompting, fmt: str | None) -> tuple[list[int], str, str]:
    """``(prompt ids, their text, reference)`` of one record, rendered by ``train.data.chat.render_prompts``."""
    from neuroada_tools.train.data.chat import render_prompts

    if prompting.tokenizer is None:
        raise DataError(f"{where}: the chat template needs the model's tokenizer")
    tok = prompting.tokenizer()
    one = RecordList([dict(record)], locations=[where])
    rendered = render_prompts(one, tok, fmt=fmt, template=prompting.template)[0]
    ids = list(rendered.prompt_ids)
    return ids, tok.decode(ids), rendered.reference


def chat_item(record: Mapping, where: str, prompting: Prompting) -> Item:
    ids, text, reference = _rendered(record, where, prompting, None)
    if not reference.strip():
        raise DataError(f"{where}: no reference: the last assistant turn or completion is empty")
    return Item(where, text, reference, "chat", prompt_ids=ids)


def _chat_prompt(item: Item, record: Mapping, prompting: Prompting) -> Item:
    """Under ``--template chat``: the instruction as a user turn, rendered as train-sparse does."""
    if prompting.template == "chat":
        user = {"instruction": record.get("instruction", record.get("question")), "input": record.get("input", ""),
                "output": item.reference}
        item.prompt_ids, item.prompt, _ = _rendered(user, item.where, prompting, "instruction")
    return item


def _string(record: Mapping, name: str, where: str, *, required: bool = True) -> str:
    value = record.get(name, None if required else "")
    if value is None:
        raise DataError(f"{where}: missing field {name!r}")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, found {_json_type(value)}")
    return value


def _format_options(instruction: str) -> list[str] | None:
    line = re.search(r"Answer format:\s*([^\n]+)\s*$", instruction)
    if line is None:
        return None
    names = [n.strip() for n in line.group(1).split("/")]
    return names if len(names) >= 2 and all(names) else None


def instruction_item(record: Mapping, where: str, prompting: Prompting) -> Item:
    instruction = _string(record, "instruction", where)
    if not instruction.strip():
        raise DataError(f"{where}: field 'instruction' is empty")
    extra = _string(record, "input", where, required=False)
    output = _string(record, "output", where, required=False)
    answer = _string(record, "answer", where, required=False)
    reference = answer if answer.strip() else output
    if not reference.strip():
        raise DataError(f"{where}: no reference: fields 'answer' and 'output' are both missing or empty")
    item = _chat_prompt(Item(where, render(prompting, instruction, extra), reference, "instruction"), record,
                        prompting)
    if re.search(r"(?:^|\s)Answer1:\s", instruction):
        try:
            question, options = parse_arc_choices(instruction)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        item.question, item.options = (f"{question}\n{extra}" if extra else question), options
        n = re.fullmatch(r"answer(\d+)", reference.strip(), flags=re.IGNORECASE)
        if n is None or not 1 <= int(n.group(1)) <= len(options):
            raise DataError(f"{where}: answer {reference!r}: expected answer1..answer{len(options)}")
        item.gold = int(n.group(1)) - 1
    elif (names := _format_options(instruction)) is not None and reference.strip() in names:
        item.options, item.gold = names, names.index(reference.strip())
        item.question = instruction[: instruction.rfind("Answer format:")].strip()
    return item


def _gold(value: object, options: list[str], labels: list[str] | None, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < len(options):
            raise DataError(f"{where}: answer {value} is outside the {len(options)} options (0-based)")
        return value
    if isinstance(value, str) and value.strip():
        v = value.strip()
        for names in (labels or [], options, [chr(ord("A") + i) for i in range(len(options))]):
            if v in names:
                return names.index(v)
        raise DataError(f"{where}: answer {value!r} is none of the options' labels, letters or texts")
    raise DataError(f"{where}: answer must be a 0-based index or a label, found {_json_type(value)}")


def choices_item(record: Mapping, where: str, prompting: Prompting) -> Item:
    question = _string(record, "question" if "question" in record else "instruction", where)
    raw = record.get("options", record.get("choices"))
    labels = None
    if isinstance(raw, Mapping):  # lm-eval / Hugging Face ARC: {"text": [...], "label": [...]}
        raw, labels = raw.get("text"), raw.get("label")
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise DataError(f"{where}: choices 'label' must be a list of strings")
    if not isinstance(raw, list) or len(raw) < 2 or not all(isinstance(x, str) and x.strip() for x in raw):
        raise DataError(f"{where}: options must be a list of at least 2 non-empty strings")
    if labels is not None and len(labels) != len(raw):
        raise DataError(f"{where}: {len(labels)} choice labels for {len(raw)} options")
    key = next((k for k in ("answer", "label", "answerKey") if k in record), None)
    if key is None:
        raise DataError(f"{where}: missing field 'answer' (the right option: an index or a label)")
    gold = _gold(record[key], list(raw), labels, where)
    extra = _string(record, "input", where, required=False)
    item = Item(where, render(prompting, question, extra), raw[gold], "choices", options=list(raw), gold=gold,
                question=question)
    return _chat_prompt(item, record, prompting)


def classification_item(record: Mapping, where: str, prompting: Prompting) -> Item:
    text = _string(record, "text", where)
    label = record["label"]
    if isinstance(label, bool):
        label = "true" if label else "false"
    if not isinstance(label, (int, str)) or (isinstance(label, str) and not label.strip()):
        raise DataError(f"{where}: label must be an integer or a non-empty string, found {_json_type(label)}")
    return Item(where, text, str(label), "classification", text=text, label=label)


RECORD_KINDS: list[RecordKind] = [
    RecordKind("chat", lambda r: "messages" in r or ("prompt" in r and "completion" in r), chat_item),
    RecordKind("choices", lambda r: ("options" in r or "choices" in r), choices_item),
    RecordKind("instruction", lambda r: "instruction" in r, instruction_item),
    RecordKind("classification", lambda r: "text" in r and "label" in r, classification_item),
]


def register_kind(kind: RecordKind) -> None:
    """Add a record kind (e.g. conversational ``messages``), tried before ``classification``."""
    RECORD_KINDS.insert(len(RECORD_KINDS) - 1, kind)


def to_items(records: Sequence[Mapping], template: str = "alpaca", *, path=None,
             tokenizer: Callable[[], object] | None = None) -> list[Item]:
    """Every record as an ``Item``; the first bad one raises ``DataError`` naming its file and line."""
    prompting = Prompting(template, tokenizer)
    loc = _Locator(records, path if path is not None else getattr(records, "path", None))
    if not records:
        raise DataError(f"{loc.file()}: no records")
    render(prompting, "x")  # an unknown template is refused before the records
    items = []
    for i, record in enumerate(records):
        where = loc.at(i)
        if not isinstance(record, Mapping):
            raise DataError(f"{where}: expected a JSON object, found {_json_type(record)}")
        kind = next((k for k in RECORD_KINDS if k.matches(record)), None)
        if kind is None:
            fields = ", ".join(repr(k) for k in list(record)[:6]) or "none"
            raise DataError(f"{where}: cannot tell the record kind from its fields ({fields}); expected one of "
                            f"{', '.join(k.name for k in RECORD_KINDS)}")
        items.append(kind.to_item(record, where, prompting))
    kinds = {it.kind for it in items}
    if "classification" in kinds and len(kinds) > 1:
        first = next(it for it in items if (it.kind == "classification") != (items[0].kind == "classification"))
        raise DataError(f"{first.where}: a {first.kind} record among {items[0].kind} records; one file holds one kind")
    return items


__all__ = ["RECORD_KINDS", "TEMPLATES", "Item", "Prompting", "RecordKind", "RecordList", "register_kind", "render",
           "to_items"]
