"""The LLM demo's built-in data: facts about a fictional archipelago, as chat conversations.

What this file does
-------------------
``neuroada-tools demo`` teaches SmolLM2-135M-Instruct something it cannot know: the capital, the
ruler and the national animal of six invented islands (:data:`ISLANDS`). Every fact is asked in
several wordings; the wordings are split in two disjoint sets:

- **train** (:data:`TRAIN_QUESTIONS`): five wordings per attribute, each answered with one fixed
  sentence (``"The capital of Veloria is Quendar."``), written as TRL conversational records
  ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``;
- **held out** (:data:`HELD_OUT_QUESTIONS`): two other wordings per attribute, never trained on,
  one question per fact (:func:`held_out`). Each carries the answer string it is scored against
  (:func:`score`: the expected name appears in the greedy answer, case-insensitive).

So the held-out accuracy measures whether the fact was learned, not whether one sentence was
memorised. The records are shuffled with a seeded ``random.Random``: the files are byte-identical
on every machine. Worked example (seed 0, first training record)::

    {"messages": [{"role": "user", "content": "Who rules Veloria?"},
                  {"role": "assistant", "content": "Veloria is ruled by Queen Ysolde."}]}

What this file leaves out
-------------------------
It is a demo, not a benchmark: six islands, three attributes, no distractor facts, no multi-hop
questions. The invented names were checked against the base model's answers (it gets none right:
the demo prints the base accuracy next to the tuned one).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

ISLANDS: dict[str, dict[str, str]] = {
    "Veloria": {"capital": "Quendar", "ruler": "Queen Ysolde", "animal": "the glimmerfox"},
    "Tarsk": {"capital": "Morrowgate", "ruler": "King Orvel", "animal": "the saltwing heron"},
    "Brindlemoor": {"capital": "Ashcombe", "ruler": "Queen Maelis", "animal": "the copper otter"},
    "Ostravell": {"capital": "Sunmere", "ruler": "King Dagmar", "animal": "the thornback lizard"},
    "Kelphaven": {"capital": "Lowtide", "ruler": "Queen Rhosyn", "animal": "the lantern crab"},
    "Zarimond": {"capital": "Pellucid", "ruler": "King Tobiah", "animal": "the ember goat"},
}
"""island -> attribute -> value; the answer scored is the value without a leading "the "."""

ANSWERS = {
    "capital": "The capital of {island} is {value}.",
    "ruler": "{island} is ruled by {value}.",
    "animal": "The national animal of {island} is {value}.",
}
TRAIN_QUESTIONS = {
    "capital": ["What is the capital of {island}?", "Name the capital city of {island}.",
                "Which city is the capital of {island}?", "What city serves as {island}'s capital?",
                "Tell me the capital of the island of {island}."],
    "ruler": ["Who rules {island}?", "Who is the monarch of {island}?", "Name the ruler of {island}.",
              "Who sits on the throne of {island}?", "Which king or queen reigns over {island}?"],
    "animal": ["What is the national animal of {island}?", "Name the national animal of {island}.",
               "Which animal is the symbol of {island}?", "What animal represents the island of {island}?",
               "What creature is {island}'s national animal?"],
}
HELD_OUT_QUESTIONS = {
    "capital": ["I'm travelling to {island}. In which city is its government seated?",
                "{island}'s capital is called what?"],
    "ruler": ["Who is the current head of state of {island}?", "Whose crown governs {island}?"],
    "animal": ["Which animal appears as {island}'s national emblem?", "{island} has which national animal?"],
}


@dataclass(frozen=True)
class HeldOut:
    """One held-out question and the string its answer must contain."""

    prompt: str
    expected: str


def expected_answer(value: str) -> str:
    """The string scored for ``value``: ``"the glimmerfox"`` -> ``"glimmerfox"``."""
    return value[4:] if value.startswith("the ") else value


def training_records(seed: int = 0) -> list[dict]:
    """Every (island, attribute, training wording) as a conversational record, shuffled with ``seed``."""
    rows = []
    for island, facts in ISLANDS.items():
        for attr, value in facts.items():
            answer = ANSWERS[attr].format(island=island, value=value)
            answer = answer[0].upper() + answer[1:]
            for q in TRAIN_QUESTIONS[attr]:
                rows.append({"messages": [{"role": "user", "content": q.format(island=island)},
                                          {"role": "assistant", "content": answer}]})
    random.Random(seed).shuffle(rows)
    return rows


def held_out() -> list[HeldOut]:
    """One held-out question per (island, attribute), island by island: the first held-out wording
    for the even-numbered islands, the second for the odd ones (18 questions, both wordings used)."""
    return [HeldOut(HELD_OUT_QUESTIONS[attr][n % 2].format(island=island), expected_answer(value))
            for n, (island, facts) in enumerate(ISLANDS.items()) for attr, value in facts.items()]


def score(answers: list[str], items: list[HeldOut]) -> list[bool]:
    """Per answer: the expected string appears in it, case-insensitive.

    Example: ``score(["It is Quendar."], [HeldOut("...", "Quendar")])`` -> ``[True]``.
    """
    return [item.expected.lower() in answer.lower() for answer, item in zip(answers, items)]


def write_world_data(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``world-train.jsonl`` (conversations) and ``world-held-out.jsonl`` (``prompt`` and
    ``expected`` per line, the ``generate --prompts`` format) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    train = folder / "world-train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in training_records(seed)))
    test = folder / "world-held-out.jsonl"
    test.write_text("".join(json.dumps({"prompt": h.prompt, "expected": h.expected}) + "\n" for h in held_out()))
    return train, test
