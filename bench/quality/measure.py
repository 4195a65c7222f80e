"""Training, scoring and the cost measurements of the quality benchmark, every one through the
training step that ships (``neuroada_tools.train.steps``): ``make_optimizer``, ``optimizer_step``
(forward, fp32 loss, backward, clipping, AdamW), ``lr_at`` / ``warmup_steps`` (the schedule) and
``evaluate``. The warmup ratio and the clipping norm are ``train-sparse``'s defaults. The loop around
the step is the benchmark's: a fixed number of steps over its length-grouped batches, one
micro-batch per step, each step timed, and a run that hits a NaN/Inf loss or gradient marked
diverged where ``train-sparse`` would stop with an error.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import time

from neuroada_tools.train.config import TrainConfig
from neuroada_tools.train.data import collate
from neuroada_tools.train.steps import (
    NonFinite,
    compute_loss,
    lr_at,
    make_optimizer,
    optimizer_step,
    warmup_steps,
)
from neuroada_tools.train.steps import evaluate as shipped_evaluate
from quality.methods import Context, Method, build_method
from quality.tasks import TASK_KIND, TaskData, TaskSettings, length_of, train_batches

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
WARMUP_RATIO = _DEFAULTS["warmup_ratio"]  # 0.06
CLIP = _DEFAULTS["max_grad_norm"]  # 1.0
WEIGHT_DECAY = 0.0  # the same for every method (train-sparse's default too)


def _device(model):
    return next(model.parameters()).device


def train_run(ctx: Context, model, params, data: TaskData, task: str, s: TaskSettings, lr: float,
              seed: int, log=None) -> dict:
    """``s.steps`` shipped optimizer steps over the batches of ``seed``, at the shipped schedule
    peaking at ``lr``. Returns the step times (first 3 left out), the first and last losses and
    whether the run diverged (a NaN/Inf loss or gradient: stopped there)."""
    kind, device = TASK_KIND[task], _device(model)
    opt = make_optimizer(params, lr, WEIGHT_DECAY)
    warmup = warmup_steps(s.steps, WARMUP_RATIO)
    model.train()
    times, losses = [], []
    diverged = False
    for step, idx in enumerate(train_batches(data.train, s.batch, s.steps, seed)):
        batch = collate([data.train[i] for i in idx], ctx.pad_id)
        t0 = time.perf_counter()
        try:
            done = optimizer_step(model, params, opt, [batch], kind, device, lr_at(step, s.steps, warmup, lr), CLIP)
        except NonFinite:
            diverged = True
            break
        times.append(time.perf_counter() - t0)
        losses.append(done.loss)
    del opt
    return {"step_s": times[3:] if len(times) > 3 else times, "loss_first": losses[:5], "loss_last": losses[-10:],
            "diverged": diverged}


def evaluate(ctx: Context, model, examples: list, task: str, eval_batch: int) -> dict:
    """``{"acc", "loss"}`` of the shipped ``evaluate`` (mean loss per example), on the examples
    sorted by length so batches carry little padding; the model is put back in train mode."""
    order = sorted(range(len(examples)), key=lambda i: length_of(examples[i]))
    got = shipped_evaluate(model, [examples[i] for i in order], TASK_KIND[task], ctx.pad_id, eval_batch,
                           _device(model))
    model.train()
    loss = got["loss"] if math.isfinite(got["loss"]) else float("inf")
    return {"acc": got["accuracy"], "loss": loss}


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def memory_probe(ctx: Context, data: TaskData, task: str, method: Method, s: TaskSettings, lr: float) -> dict:
    """Peak RSS increase over 3 shipped optimizer steps on the batch of the ``s.batch`` longest
    training examples, from the RSS once the model, adapter and optimizer are built."""
    model, params, _ = build_method(ctx, task, method, 0)
    opt = make_optimizer(params, lr, WEIGHT_DECAY)
    longest = sorted(range(len(data.train)), key=lambda i: -length_of(data.train[i]))[: s.batch]
    batch = collate([data.train[i] for i in longest], ctx.pad_id)
    kind, device = TASK_KIND[task], _device(model)
    model.train()
    gc.collect()
    reset = True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        reset = False
    base = _rss_kib("VmRSS")
    diverged = False
    for _ in range(3):
        try:
            optimizer_step(model, params, opt, [batch], kind, device, lr, CLIP)
        except NonFinite:
            diverged = True
            break
    peak = _rss_kib("VmHWM")
    return {"peak_delta_mib": (peak - base) / 1024, "rss_base_mib": base / 1024, "hwm_reset": reset,
            "batch_shape": list(batch["input_ids"].shape), "diverged": diverged}


def interleaved_step_ms(ctx: Context, data: TaskData, task: str, methods: list[Method], s: TaskSettings,
                        reps: int) -> dict:
    """Median ms of one training step per method, all methods built side by side and stepped in
    rotation on the same batches (batch ``i`` for every method in repetition ``i``; the order
    rotates each repetition; the first 2 repetitions are warm-up), so a busy neighbour slows every
    method alike. The step is the shipped ``optimizer_step`` at a constant lr of 1e-4."""
    kind = TASK_KIND[task]
    built = []
    for m in methods:
        model, params, _ = build_method(ctx, task, m, 0)
        model.train()
        built.append((m.name, model, params, make_optimizer(params, 1e-4, WEIGHT_DECAY)))
    batches = [collate([data.train[i] for i in idx], ctx.pad_id) for idx in train_batches(data.train, s.batch, reps, 0)]
    times: dict[str, list[float]] = {name: [] for name, *_ in built}
    for rep, batch in enumerate(batches):
        shift = rep % len(built)
        for name, model, params, opt in built[shift:] + built[:shift]:
            t0 = time.perf_counter()
            try:
                optimizer_step(model, params, opt, [batch], kind, _device(model), 1e-4, CLIP)
            except NonFinite:
                continue
            if rep >= 2:
                times[name].append(time.perf_counter() - t0)
    del built
    gc.collect()
    return {name: 1e3 * statistics.median(t) for name, t in times.items() if t}


def gradient_share(ctx: Context, data: TaskData, task: str, s: TaskSettings, ks=(1, 4, 16), batches: int = 8) -> dict:
    """Where the task gradient lies, for the 36 target matrices of the pretrained model: the gradient of
    the loss summed over the first ``batches`` training batches (seed 0) of full fine-tuning (the head
    as initialised with seed 0), and the share of its squared norm that falls on NeuroAda's support
    (k largest |W| per row), that the best rank-r update could capture (top-r singular values, r the
    matched LoRA rank), and that the k largest |gradient| entries per row hold (an oracle support).
    The loss is the shipped ``compute_loss`` (mean over each batch's examples)."""
    import torch

    from neuroada_tools.io.names import match_names

    model, _, _ = build_method(ctx, task, Method("full", "full"), 0)
    model.train()
    kind, device = TASK_KIND[task], _device(model)
    for idx in train_batches(data.train, s.batch, batches, 0):
        batch = collate([data.train[i] for i in idx], ctx.pad_id)
        loss_sum, _ = compute_loss(model, batch, kind, device)
        (loss_sum / len(idx)).backward()
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
                       "topk_grad_per_row": oracle / total, "random_support": rand / total}
    return out
