"""Multiple-choice examples (ARC with an encoder): one (question, option) encoding per option."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from neuroada_tools.errors import DataError
from neuroada_tools.train.data.examples import BuildStats, Examples, _encode_truncated
from neuroada_tools.train.data.prompts import _check_max_length, _field_str
from neuroada_tools.train.data.records import _json_type, _Locator

if TYPE_CHECKING:  # pragma: no cover - typing only; importing transformers is slow
    from transformers import PreTrainedTokenizerBase

_ARC_PREFIX = "Please choose the correct answer to the question:"


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
