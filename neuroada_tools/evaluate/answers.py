"""Turn a generated text into an answer and compare it with the reference; the 95% interval.

Extraction rules (``RULES``), as the NeuroAda authors evaluate, who follow LLM-Adapters
(``commonsense_evaluate.py`` ``extract_answer`` and ``evaluate.py`` ``extract_answer_number``; the
authors' ``compute_metrics.py`` repeats them). Every rule reads the generated text after the
prompt, stripped, and is case-sensitive as theirs are:

====================  =============================================  ===================================
rule                  answer taken from the generation               data sets
====================  =============================================  ===================================
``boolq``             the first ``true`` or ``false``                 BoolQ
``choice``            the first of ``answer1`` .. ``answer5``         ARC-Easy/Challenge, OBQA, SIQA
``piqa``              the first ``solution1`` or ``solution2``        PIQA
``hellaswag``         the first of ``ending1`` .. ``ending4``         HellaSwag
``winogrande``        the first ``option1`` or ``option2``            WinoGrande
``number``            the last number (commas removed), as a float;   AddSub, MultiArith, SingleEq,
                      right when within 0.001 of the reference        SVAMP, GSM8K
``letter``            the first capital ``A`` .. ``E``                AQuA
``exact``             the whole text; right when equal to the         free-form references (ours, not
                      reference after ``normalize`` (SQuAD's rule)    the authors')
====================  =============================================  ===================================

A generation where the rule finds nothing is *unparsed*: counted wrong, and reported apart.
``detect_rule`` picks the rule from the references of a file (every one must fit it).

Worked example: rule ``choice`` on ``"the correct answer is answer3. answer1 is wrong"`` gives
``"answer3"``; rule ``number`` on ``"5 + 7 = 12, so 1,200 apples"`` gives ``1200.0``; ``normalize("The
 Eiffel-Tower!")`` is ``"eiffeltower"``.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

from neuroada_tools.errors import DataError


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: str | None  # the first match is the answer (None: the rule has its own extractor)
    reference: str  # a regex every reference of the rule fits


RULES = {
    "boolq": Rule("boolq", r"true|false", r"true|false"),
    "choice": Rule("choice", r"answer1|answer2|answer3|answer4|answer5", r"answer[1-5]"),
    "piqa": Rule("piqa", r"solution1|solution2", r"solution[12]"),
    "hellaswag": Rule("hellaswag", r"ending1|ending2|ending3|ending4", r"ending[1-4]"),
    "winogrande": Rule("winogrande", r"option1|option2", r"option[12]"),
    "number": Rule("number", None, r"-?[\d,]*\.?\d+"),
    "letter": Rule("letter", r"A|B|C|D|E", r"[A-E]"),
    "exact": Rule("exact", None, r"(?s).*"),
}
DETECT_ORDER = ("boolq", "choice", "piqa", "hellaswag", "winogrande", "number", "letter")
NUMBER_TOLERANCE = 1e-3


def detect_rule(references: Sequence[str]) -> str:
    """The first rule of ``DETECT_ORDER`` that every reference fits in full, else ``exact``.

    Example: ``["answer1", "answer4"]`` -> ``"choice"``; ``["12", "3.5"]`` -> ``"number"``;
    ``["Paris", "answer2"]`` -> ``"exact"``.
    """
    for name in DETECT_ORDER:
        if references and all(re.fullmatch(RULES[name].reference, r.strip()) for r in references):
            return name
    return "exact"


def check_reference(rule: str, reference: str, where: str) -> None:
    """Refuse a reference the rule cannot compare with (``where`` names the file and line)."""
    if rule not in RULES:
        raise DataError(f"unknown answer rule {rule!r} (expected one of {', '.join(RULES)})")
    if not re.fullmatch(RULES[rule].reference, reference.strip()):
        raise DataError(f"{where}: reference {reference!r} does not fit the answer rule {rule!r} "
                        f"(expected {RULES[rule].reference})")


def last_number(text: str) -> float | None:
    """The last number of ``text`` with commas removed (LLM-Adapters ``extract_answer_number``).

    Example: ``last_number("3 boxes of 1,200 = 3600.")`` -> ``3600.0``; ``last_number("none")`` -> None.
    """
    found = re.findall(r"-?\d+\.?\d*", text.replace(",", ""))
    return float(found[-1]) if found else None


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, drop ASCII punctuation, drop the articles a/an/the,
    squeeze whitespace. Example: ``normalize("  The  Eiffel-Tower! ")`` -> ``"eiffeltower"``."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def extract(rule: str, text: str) -> str | None:
    """The answer ``rule`` finds in a generated ``text`` (as a string), or None (unparsed)."""
    text = text.strip()
    if rule == "number":
        value = last_number(text)
        return None if value is None else repr(value)
    if rule == "exact":
        return text if text else None
    found = re.search(RULES[rule].pattern, text)
    return found.group(0) if found else None


def is_correct(rule: str, answer: str | None, reference: str) -> bool:
    """Whether an extracted ``answer`` matches ``reference`` under ``rule`` (None is never right)."""
    if answer is None:
        return False
    if rule == "number":
        return abs(float(answer) - float(reference.replace(",", ""))) <= NUMBER_TOLERANCE
    if rule == "exact":
        return normalize(answer) == normalize(reference)
    return answer == reference.strip()


def wilson(correct: int, total: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% with the default ``z``).

    ``(p + z^2/2n -/+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)`` with ``p = correct / total``.
    Example: ``wilson(8, 10)`` -> ``(0.4902, 0.9433)`` (rounded); ``wilson(0, 0)`` -> ``(0.0, 1.0)``.
    """
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    z2 = z * z
    centre = p + z2 / (2 * total)
    half = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total))
    scale = 1 + z2 / total
    return max(0.0, (centre - half) / scale), min(1.0, (centre + half) / scale)
