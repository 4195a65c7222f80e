"""Training, scoring and the cost measurements of the quality benchmark, every one through the
training step that ships (``neuroada_tools.train.steps``): ``make_optimizer``, ``optimizer_step``
(forward, fp32 loss, backward, clipping, AdamW), ``lr_at`` / ``warmup_steps`` (the schedule) and
``evaluate``. The warmup ratio and the clipping norm are ``train-sparse``'s defaults. The loop around
the step is the benchmark's: a fixed number of steps over its length-grouped batches, one
micro-batch per step, each step timed, and a run that hits a NaN/Inf loss or gradient marked
diverged where ``train-sparse`` would stop with an error.

Peak memory of a run (``PeakMemory``): CUDA, ``max_memory_allocated`` over the training steps minus
the memory allocated when they start (the model, adapter and head are built; the optimizer state
is not yet); CPU, the rise of the process's resident-set high-water mark over the same span
(``/proc/self/clear_refs`` resets it; glibc is told to serve allocations over 128 KiB with mmap and
trimmed before, so memory freed by earlier runs is not silently reused). Both count activations,
gradients, optimizer state and autograd buffers, not the base weights every method holds.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import hashlib
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
from quality.tasks import TASK_KIND, TaskData, length_of, train_batches

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
WARMUP_RATIO = _DEFAULTS["warmup_ratio"]  # 0.06
CLIP = _DEFAULTS["max_grad_norm"]  # 1.0
WEIGHT_DECAY = 0.0  # the same for every method (train-sparse's default too)


def _device(model):
    return next(model.parameters()).device


def batches_digest(batches: list[list[int]]) -> str:
    return hashlib.sha256(repr(batches).encode()).hexdigest()[:16]


class PeakMemory:
    """``with PeakMemory(device) as pm: ...`` then ``pm.mib`` (see the module docstring)."""

    _libc = None

    def __init__(self, device):
        self.device = device
        self.mib = float("nan")
        self.how = ""

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.how = "cuda max_memory_allocated"
            return self
        try:
            if PeakMemory._libc is None:
                PeakMemory._libc = ctypes.CDLL("libc.so.6")
                PeakMemory._libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, so frees go back
            PeakMemory._libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _status_kib("VmRSS")
            self.how = "rss high-water mark"
        except OSError:
            self.base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        elif self.base is not None:
            self.mib = (_status_kib("VmHWM") - self.base) / 1024
        return False


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def train_run(ctx: Context, model, params, data: TaskData, task: str, steps: int, batch: int, lr: float,
              seed: int) -> dict:
    """``steps`` shipped optimizer steps over the batches of ``seed``, at the shipped schedule
    peaking at ``lr``. torch is seeded with ``seed`` again just before the first step, so the
    dropout masks of a seed are the same for every method too. Returns the step times (first 3 left
    out), the first and last losses, the peak memory, the batch order's digest and whether the run
    diverged (a NaN/Inf loss or gradient: stopped there)."""
    import torch

    kind, device = TASK_KIND[task], _device(model)
    order = train_batches(data.train, batch, steps, seed)
    opt = make_optimizer(params, lr, WEIGHT_DECAY)
    warmup = warmup_steps(steps, WARMUP_RATIO)
    model.train()
    times, losses = [], []
    diverged = False
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    with PeakMemory(device) as pm:
        for step, idx in enumerate(order):
            batch_t = collate([data.train[i] for i in idx], ctx.pad_id)
            t0 = time.perf_counter()
            try:
                done = optimizer_step(model, params, opt, [batch_t], kind, device, lr_at(step, steps, warmup, lr),
                                      CLIP)
            except NonFinite:
                diverged = True
                break
            times.append(time.perf_counter() - t0)
            losses.append(done.loss)
    del opt
    step_s = times[3:] if len(times) > 3 else times
    return {"steps": len(times), "train_s": time.perf_counter() - t_start,
            "step_ms": 1e3 * statistics.median(step_s) if step_s else float("nan"),
            "loss_first": losses[:3], "loss_last": losses[-5:], "diverged": diverged,
            "peak_mib": pm.mib, "peak_how": pm.how, "batches_sha": batches_digest(order)}


def evaluate(ctx: Context, model, examples: list, task: str, eval_batch: int) -> dict:
    """``{"acc", "loss", "seconds"}`` of the shipped ``evaluate`` (mean loss per example), on the
    examples sorted by length so batches carry little padding; the model is put back in train mode.
    The LLM task is scored by ``evaluate``'s option log-likelihood instead (``llm.score``; ``acc_norm`` too)."""
    if TASK_KIND[task] == "causal-lm":  # the LLM task: evaluate's option log-likelihood (llm.py)
        from quality import llm

        return llm.score(model, examples, ctx.pad_id, eval_batch)
    t0 = time.perf_counter()
    order = sorted(range(len(examples)), key=lambda i: length_of(examples[i]))
    got = shipped_evaluate(model, [examples[i] for i in order], TASK_KIND[task], ctx.pad_id, eval_batch,
                           _device(model))
    model.train()
    loss = got["loss"] if math.isfinite(got["loss"]) else float("inf")
    return {"acc": got["accuracy"], "loss": loss, "seconds": time.perf_counter() - t0}


def time_steps(ctx: Context, model, params, data: TaskData, task: str, batches: list[list[int]]) -> list[float]:
    """Seconds of one shipped optimizer step on each of ``batches`` (at a constant lr of 1e-4)."""
    kind, device = TASK_KIND[task], _device(model)
    opt = make_optimizer(params, 1e-4, WEIGHT_DECAY)
    model.train()
    out = []
    for idx in batches:
        batch_t = collate([data.train[i] for i in idx], ctx.pad_id)
        t0 = time.perf_counter()
        try:
            optimizer_step(model, params, opt, [batch_t], kind, device, 1e-4, CLIP)
        except NonFinite:
            pass
        out.append(time.perf_counter() - t0)
    return out


def interleaved_step_ms(ctx: Context, data: TaskData, task: str, methods: list[Method], batch: int,
                        reps: int) -> dict:
    """Median ms of one training step per method, all methods built side by side and stepped in
    rotation on the same batches (batch ``i`` for every method in repetition ``i``; the order
    rotates each repetition; the first 2 repetitions are warm-up), so a busy neighbour slows every
    method alike. The step is the shipped ``optimizer_step`` at a constant lr of 1e-4."""
    kind = TASK_KIND[task]
    built = []
    for m in (m for m in methods if m.kind != "zero-shot"):  # nothing to step
        model, params, _ = build_method(ctx, task, m, 0)
        model.train()
        built.append((m.name, model, params, make_optimizer(params, 1e-4, WEIGHT_DECAY)))
    batches = [collate([data.train[i] for i in idx], ctx.pad_id) for idx in train_batches(data.train, batch, reps, 0)]
    times: dict[str, list[float]] = {name: [] for name, *_ in built}
    for rep, batch_t in enumerate(batches):
        shift = rep % len(built)
        for name, model, params, opt in built[shift:] + built[:shift]:
            t0 = time.perf_counter()
            try:
                optimizer_step(model, params, opt, [batch_t], kind, _device(model), 1e-4, CLIP)
            except NonFinite:
                continue
            if rep >= 2:
                times[name].append(time.perf_counter() - t0)
    del built
    gc.collect()
    return {name: 1e3 * statistics.median(t) for name, t in times.items() if t}


def gradient_share(ctx: Context, data: TaskData, task: str, batch: int, ks=(1, 4, 16), batches: int = 8) -> dict:
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
    for idx in train_batches(data.train, batch, batches, 0):
        batch_t = collate([data.train[i] for i in idx], ctx.pad_id)
        loss_sum, _ = compute_loss(model, batch_t, kind, device)
        (loss_sum / len(idx)).backward()
    params = dict(model.named_parameters())
    out = {}
    for k in ks:
        index = ctx.index(k)
        names = match_names(sorted(index.indices), list(params))
        r = ctx.budget.lora_r(k)
        total = support = lowrank = oracle = rand = 0.0
        for n in sorted(index.indices):
            g = params[names[n]].grad.double().cpu()
            total += float((g ** 2).sum())
            rand += float((g ** 2).sum()) * k / g.shape[1]  # k random inputs per row: k / d_in of each row's energy
            support += float((g.gather(1, index.indices[n].long()) ** 2).sum())
            lowrank += float((torch.linalg.svdvals(g)[:r] ** 2).sum())
            oracle += float((g.abs().topk(k, dim=1).values ** 2).sum())
        out[str(k)] = {"r": r, "neuroada_support": support / total, "best_rank_r": lowrank / total,
                       "topk_grad_per_row": oracle / total, "random_support": rand / total}
    return out
