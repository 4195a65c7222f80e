"""One training step's parts: the loss, evaluation, one optimizer step, the schedule and the data order.

The pieces ``train`` (``loop.py``) is made of, and that ``bench/bench_quality.py`` drives for every
method it compares, so the benchmark measures the step that ships.

The loss. Causal LM: token cross-entropy on the positions whose label is not ``-100`` (the
prompt is masked unless ``train_on_prompt``; see ``data.py`` for the template), averaged over
every target token of the optimizer step, not per micro-batch, so ``grad_accum=4, batch_size=2``
and ``batch_size=8`` give the same gradient. Examples whose target was cut away by
``max_length`` are dropped before training (an all ``-100`` batch would give a NaN mean).
Classification: cross-entropy of the head's logits, averaged over the step's examples. Multiple
choice: the same over the options, with padded options masked to ``-inf``. The loss is computed in
fp32 from the model's logits whatever the model dtype.

The schedule (as transformers' ``get_linear_schedule_with_warmup``). With ``T`` total optimizer
steps and ``W = ceil(warmup_ratio * T)`` warmup steps, step ``s`` (0-based) uses
``lr * s / W`` for ``s < W`` and ``lr * (T - s) / (T - W)`` after. Worked example: ``lr = 1e-3,
T = 10, warmup_ratio = 0.1`` gives ``W = 1`` and the rates ``0, 1e-3, 8.9e-4, ..., 1.1e-4``.
``T`` is ``max_steps`` if given, else ``epochs * ceil(ceil(N / batch_size) / grad_accum)`` for
``N`` examples.

Data order. Epoch ``e`` visits the examples in the order ``torch.randperm(N)`` drawn from a
generator seeded with ``sha256(f"{seed}:{e}")`` (first 8 bytes, little endian), cut into
micro-batches of ``batch_size`` (the last one may be smaller); an optimizer step takes
``grad_accum`` consecutive micro-batches (fewer at the end of an epoch). The order depends on the
seed and the epoch only, so a resumed run finds its place again from ``(epoch, micro-batch)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from neuroada_tools.train.data import IGNORE_INDEX, collate


class NonFinite(Exception):
    """The loss or the gradient norm of a step is NaN or infinite; ``what`` says which."""

    def __init__(self, what: str) -> None:
        super().__init__(f"the {what} became NaN or infinite")
        self.what = what


@dataclass
class StepResult:
    """What one optimizer step did."""

    loss: float  # mean loss over the step's targets
    tokens: int  # input tokens processed (padding excluded)
    targets: int  # target tokens (causal LM) or examples the loss was averaged over


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    keys = ("input_ids", "attention_mask", "token_type_ids")
    return {k: batch[k].to(device) for k in keys if k in batch}


def compute_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], task: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of the per-target losses, number of correct predictions)`` for one collated batch.

    Causal LM: next-token cross-entropy summed over labels that are not ``-100`` (the "correct"
    count is the tokens predicted right). Classification and multiple choice: cross-entropy of
    the logits summed over the examples; padded options (``choice_mask`` False) get ``-inf``.
    Example: two classification rows with logits ``[[0, 0], [0, 0]]`` give ``2 * ln 2``.
    """
    inputs = model_inputs(batch, device)
    labels = batch["labels"].to(device)
    if task == "causal-lm":
        logits = model(**inputs, use_cache=False).logits
        logits, labels = logits[:, :-1].float(), labels[:, 1:]
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        correct = ((logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)).sum()
        return loss, correct
    logits = model(**inputs).logits.float()
    if task == "multiple-choice":
        logits = logits.masked_fill(~batch["choice_mask"].to(device), float("-inf"))
    loss = F.cross_entropy(logits, labels, reduction="sum")
    return loss, (logits.argmax(-1) == labels).sum()


def count_targets(batch: dict[str, torch.Tensor], task: str) -> int:
    """Targets the loss of ``batch`` sums over: label tokens (causal LM, the first position has no
    prediction) or examples (classification, multiple choice), those labelled ``-100`` left out."""
    if task == "causal-lm":
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return int((batch["labels"] != IGNORE_INDEX).sum())


def placeholder(example: dict[str, Any], pad_id: int) -> dict[str, torch.Tensor]:
    """A micro-batch that weighs nothing: ``example`` collated with every label ``-100``.

    For a rank whose share of a global micro-batch is empty (``train/distributed.py``): its forward
    and backward run the collectives the other ranks wait for, while the summed loss over no
    targets is exactly 0, so every gradient it adds is 0, and ``count_targets`` is 0. The key
    ``placeholder`` keeps its tokens out of the step's token count. Example: a causal-LM example
    ``[1, 5, 9]`` gives ``labels [[-100, -100, -100]]`` and a loss of ``0.0``.
    """
    batch = collate([example], pad_id)
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    batch["placeholder"] = torch.ones((), dtype=torch.bool)
    return batch


def has_target(example: dict[str, Any]) -> bool:
    return any(label != IGNORE_INDEX for label in example["labels"][1:])


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, examples: list[dict], task: str, pad_id: int, batch_size: int, device: torch.device
) -> dict:
    """Mean loss over ``examples`` (per target token for causal LM, per example otherwise) and,
    for classification and multiple choice, the accuracy. The model is left in eval mode."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for s in range(0, len(examples), batch_size):
        batch = collate(examples[s : s + batch_size], pad_id)
        loss, right = compute_loss(model, batch, task, device)
        loss_sum += float(loss)
        correct += int(right)
        count += count_targets(batch, task)
    out: dict[str, Any] = {"examples": len(examples), "loss": loss_sum / max(count, 1)}
    if task == "causal-lm":
        out["target_tokens"] = count
        out["token_accuracy"] = correct / max(count, 1)
    else:
        out["accuracy"] = correct / max(count, 1)
    return out


# ---------------------------------------------------------------- the optimizer and one step


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (betas 0.9/0.999, eps 1e-8) with weight decay on the matrices only (deltas and head
    weights), not on biases; ``foreach=False`` so CPU results do not depend on the grouping."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.999),
        eps=1e-8,
        foreach=False,
    )


def optimizer_step(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    group: list[dict[str, torch.Tensor]],
    task: str,
    device: torch.device,
    lr: float,
    max_grad_norm: float,
    *,
    dist: Any = None,
) -> StepResult:
    """One optimizer step over the collated micro-batches ``group`` at learning rate ``lr``.

    Forward and backward per micro-batch with the loss divided by the step's target count (the
    mean over the whole step), gradient clipping to ``max_grad_norm`` (0: none), AdamW, gradients
    cleared. Raises ``NonFinite("loss")`` before a backward whose loss is NaN/Inf and
    ``NonFinite("gradient")`` before an update with a NaN/Inf gradient norm; the parameters are
    then as before the step. Example: two micro-batches of 3 and 5 target tokens are each
    divided by 8, so the step's gradient is that of one batch of all 8.

    Under torchrun (``dist``, ``train/distributed.py``) ``group`` is this rank's share of the
    global step: the count is the global one (summed over ranks), each rank's loss is multiplied
    by the world size (DDP and FSDP2 average gradients over ranks; this keeps the global sum),
    gradients are reduced once per step (DDP ``no_sync`` before the last micro-batch), and the
    loss check happens once the step's loss is summed over ranks, so every rank stops together.
    The returned loss, tokens and targets are the global ones. A ``placeholder`` micro-batch (an
    empty share) adds 0 to the loss, the gradients and both counts.
    """
    from neuroada_tools.train import distributed

    world = dist.world if dist is not None and dist.enabled else 1
    local = [float(sum(count_targets(mb, task) for mb in group))]
    count = int(distributed.all_sum(dist, local, device)[0]) if world > 1 else int(local[0])
    for g in optimizer.param_groups:
        g["lr"] = lr
    step_loss, tokens = 0.0, 0
    for i, mb in enumerate(group):
        with distributed.no_sync(model, i == len(group) - 1) if world > 1 else contextlib.nullcontext():
            loss_sum, _ = compute_loss(model, mb, task, device)
            loss = loss_sum / count
            if world == 1 and not bool(torch.isfinite(loss)):
                optimizer.zero_grad(set_to_none=True)
                raise NonFinite("loss")
            (loss * world if world > 1 else loss).backward()
        step_loss += float(loss.detach())
        tokens += 0 if "placeholder" in mb else int(mb["attention_mask"].sum())
    if world > 1:
        step_loss, total_tokens = distributed.all_sum(dist, [step_loss, float(tokens)], device)
        tokens = int(total_tokens)
        if not math.isfinite(step_loss):
            optimizer.zero_grad(set_to_none=True)
            raise NonFinite("loss")
    grad_norm = torch.nn.utils.clip_grad_norm_(
        params, max_grad_norm if max_grad_norm > 0 else float("inf"), foreach=False
    )
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    if not bool(torch.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise NonFinite("gradient")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(step_loss, tokens, count)


# ---------------------------------------------------------------- schedule and data order


def warmup_steps(total: int, warmup_ratio: float) -> int:
    """``ceil(warmup_ratio * total)``: 100 steps at 0.06 warm up for 6."""
    return math.ceil(warmup_ratio * total)


def steps_per_epoch(examples: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps in one pass: ``ceil(ceil(N / batch_size) / grad_accum)``; 10, 4, 2 give 2."""
    return math.ceil(math.ceil(examples / batch_size) / grad_accum)


def lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    """The linear schedule with warmup (see the module docstring) at 0-based ``step``."""
    if step < warmup:
        return lr * step / warmup
    return lr * max(0.0, (total - step) / max(1, total - warmup))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order epoch ``epoch`` visits ``range(n)`` in (see ``epoch_batches``)."""
    g = torch.Generator()
    g.manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "little"))
    return torch.randperm(n, generator=g).tolist()


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The micro-batches of epoch ``epoch``: a seeded permutation of ``range(n)`` cut in pieces.

    The generator's seed is the first 8 bytes (little endian) of ``sha256(f"{seed}:{epoch}")``,
    so every (seed, epoch) pair has its own order, independent of any other random state.
    """
    order = epoch_order(n, seed, epoch)
    return [order[s : s + batch_size] for s in range(0, n, batch_size)]


def nan_message(what: str, step: int, lr: float, output: Path, last_saved: int | None) -> str:
    kept = (
        f"the last good checkpoint (step {last_saved}) is kept at {output}"
        if last_saved is not None
        else "no checkpoint was written yet (--save-every N keeps intermediate ones)"
    )
    return f"the {what} became NaN or infinite at step {step} (lr {lr:.3g}); training stopped, {kept}"
