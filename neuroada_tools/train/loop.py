"""The NeuroAda training loop: train the bypass deltas (and a task head) of a Hugging Face model.

``train(TrainConfig(...))`` reads top to bottom, as the ``train-sparse`` command runs it:

1. check the output paths, read the index sidecar and verify it against the base checkpoint
   (``verify_base``: a sidecar made from another base is refused, naming a tensor);
2. pick the task (``causal-lm`` for decoders, ``classification`` for encoders, or as asked),
   load the tokenizer, and read and tokenize the training (and eval) data: every bad record is
   a ``DataError`` naming the file and line, raised before the model is even loaded;
3. with ``resume``, read the resume state and check it was made by the same settings;
4. load the model with transformers, attach the bypasses, unfreeze the task head (classification
   and multiple choice: the parameters outside the base model, e.g. ``classifier.*``);
5. the loop: AdamW over the trainable parameters, a linear schedule with warmup, gradient
   accumulation, gradient clipping, a checkpoint every ``save_every`` steps;
6. the final checkpoint, the evaluation on ``eval_data``, and a ``TrainSummary``.

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

Outputs. Exactly two files, each written to a temporary name beside it and renamed into place:
the delta sidecar at ``output`` (``formats/delta-v1.md``: the deltas, the trained head under
``dense.<task-model parameter name>``, ``task``, and ``info``: the training settings, label
names, steps and last loss) and the resume state at ``state_path(output)``
(``boolq.delta.safetensors`` -> ``boolq.state.safetensors``). Both are written at every
checkpoint and at the end; nothing is ever written to the model folder. The same seed, data and
settings give byte-identical files (on CPU, for a given torch thread count: the SDDMM adds its
threads' partial sums in a fixed order; some CUDA kernels are not deterministic).

The resume state (safetensors, no pickle):

- ``param.<name>``: every trainable parameter (fp32), ``<name>`` as in ``model.named_parameters()``
  (``model.layers.0.self_attn.q_proj.neuroada_delta``, ``classifier.weight``);
- ``adam.exp_avg.<name>``, ``adam.exp_avg_sq.<name>``, ``adam.step.<name>`` (0-d fp32): AdamW's
  state for that parameter;
- ``rng.cpu`` (uint8): ``torch.get_rng_state()`` (dropout); ``rng.cuda`` on CUDA;
- ``__metadata__``: ``neuroada.magic = "neuroada-train-state"``, ``neuroada.version = "1"``, and
  ``neuroada.state``: JSON with ``step``, ``epoch``, ``batch`` (the next micro-batch of that
  epoch), ``total_steps``, the counters (``tokens``, ``target_tokens``, ``first_loss``,
  ``last_loss``), ``index_sha256``, ``data_sha256``, ``delta_sha256`` (the delta sidecar written
  with it) and ``settings`` (everything that shapes the trajectory: seed, lr, batch size, ...).

``resume`` restores all of it and continues: ``N`` steps, interrupted, then resumed to ``N + M``
gives the tensors of ``N + M`` steps straight. A resume with other settings is refused, except a
changed ``max_steps`` / ``epochs`` (the schedule is then recomputed for the new total).

A loss or gradient that is NaN or infinite stops training with ``TrainingError``; the files of
the last checkpoint stay as they were (a checkpoint is never written with non-finite values).

Left out: distributed and multi-GPU training, mixed precision with fp32 master weights (``bf16``
loads the base in bf16; deltas, head and their AdamW state are fp32 anyway), sequence packing,
evaluation during training (``eval_data`` is evaluated once, at the end), early stopping.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from neuroada_tools import __version__
from neuroada_tools.train.bypass import attach, make_delta_sidecar
from neuroada_tools.io.checkpoint import open_checkpoint
from neuroada_tools.train.data import (
    IGNORE_INDEX,
    build_causal_lm_examples,
    build_classification_examples,
    build_multiple_choice_examples,
    collate,
    read_records,
)
from neuroada_tools.errors import DataError, ModelError, OutputError, TrainingError
from neuroada_tools.io.outputs import atomic_file
from neuroada_tools.io.safetensors_file import read_all, read_header, write_file
from neuroada_tools.io.sidecar import file_digest, read_index, write_delta
from neuroada_tools.hf import TASKS, default_task, load_model, task_config
from neuroada_tools.check.binding import verify_base

STATE_MAGIC = "neuroada-train-state"
STATE_VERSION = 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# settings that shape the trajectory: a resume with any of them changed is refused
TRAJECTORY = (
    "task", "seed", "lr", "weight_decay", "warmup_ratio", "batch_size", "grad_accum", "max_length",
    "max_grad_norm", "train_on_prompt", "dtype", "label_field", "text_field", "num_labels",
)


@dataclass
class TrainConfig:
    """Everything ``train`` needs; the ``train-sparse`` options map one to one onto these fields."""

    model: Path  # model folder (config.json, safetensors, tokenizer)
    index: Path  # index sidecar made from that model's checkpoint
    data: Path  # training data: JSON list or JSONL (instruction, text or classification records)
    output: Path  # delta sidecar to write; the resume state goes to state_path(output)
    task: str | None = None  # causal-lm | classification | multiple-choice; None: from the config
    num_labels: int | None = None  # classification: default from the data's labels
    label_field: str | None = None  # classification: default "label" ("answer" for instruction data)
    text_field: str | None = None  # classification: default "text" (instruction [+ input] for instruction data)
    eval_data: Path | None = None
    lr: float = 7e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    epochs: int = 3
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    max_grad_norm: float = 1.0  # 0: no clipping
    seed: int = 0
    dtype: str = "fp32"  # fp32 | bf16: the dtype the base model is loaded in
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:1, ...
    gradient_checkpointing: bool = False
    save_every: int = 0  # checkpoint every N optimizer steps (0: only at the end)
    resume: bool = False
    train_on_prompt: bool = False
    trust_remote_code: bool = False
    force: bool = False


@dataclass
class TrainSummary:
    """What a run did; ``to_dict`` is the ``--json`` summary (``losses`` is left out of it)."""

    output: str
    state: str
    sha256: str
    task: str
    steps: int  # optimizer steps done in total (including before a resume)
    start_step: int  # 0, or the step a resumed run started from
    total_steps: int
    epochs: float  # steps / steps per epoch
    examples: int
    skipped_examples: int  # causal LM: examples whose target was cut away by max_length
    truncated_examples: int
    tokens: int  # input tokens processed (padding excluded), in total
    target_tokens: int  # tokens (causal LM) or examples (classification) the loss was taken over
    seconds: float  # wall time of this run's loop
    first_loss: float | None
    last_loss: float | None
    trainable_parameters: int
    delta_parameters: int
    head_parameters: int
    lr: float
    seed: int
    device: str
    dtype: str
    label_names: list[str] | None = None
    eval: dict | None = None  # {"examples", "loss", "accuracy" (classification, multiple choice)}
    losses: list[float] = field(default_factory=list)  # per step, this run

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["losses"]
        return d


@dataclass
class StepInfo:
    """Passed to the ``on_step`` callback after every optimizer step."""

    step: int
    total_steps: int
    loss: float
    lr: float


def state_path(output: Path | str) -> Path:
    """Where the resume state of the delta sidecar ``output`` lives.

    ``boolq.delta.safetensors`` -> ``boolq.state.safetensors``; ``out.safetensors`` ->
    ``out.state.safetensors``; any other name gets ``.state.safetensors`` appended.
    """
    output = Path(output)
    name = output.name
    for suffix in (".delta.safetensors", ".safetensors"):
        if name.endswith(suffix) and len(name) > len(suffix):
            stem = name[: -len(suffix)]
            if not stem.endswith(".state"):
                return output.with_name(stem + ".state.safetensors")
    return output.with_name(name + ".state.safetensors")


def train(
    cfg: TrainConfig,
    *,
    on_start: Callable[[int, int], None] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
) -> TrainSummary:
    """Train the NeuroAda deltas of ``cfg.model`` on ``cfg.data``; see the module docstring.

    ``on_start(total_steps, start_step)`` is called once before the first step, ``on_step`` after
    every step (a progress bar). Raises ``OutputError``, ``SidecarError``/``FingerprintError``,
    ``ModelError``, ``DataError`` before anything is trained or written, and ``TrainingError``
    when the loss becomes NaN or a resume state does not fit.
    """
    _check_options(cfg)
    model_dir, output, state_file = Path(cfg.model), Path(cfg.output), state_path(cfg.output)

    # ---- 1. outputs, index and base ------------------------------------------------------------
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir}: not a model folder (--model takes the folder with config.json)")
    _check_outputs(cfg, model_dir, output, state_file)
    index = read_index(cfg.index)
    ckpt = open_checkpoint(model_dir)
    verify_base(index, ckpt)  # FingerprintError naming the tensor if the index is from another base
    config_dict = ckpt.config or {}
    task = cfg.task or default_task(config_dict)
    if task not in TASKS:
        raise ModelError(f"unknown task {task!r} (choose {', '.join(TASKS)})")

    positions = config_dict.get("max_position_embeddings") or config_dict.get("n_positions")
    if isinstance(positions, int) and not isinstance(positions, bool) and cfg.max_length > positions:
        raise ModelError(
            f"--max-length {cfg.max_length} is longer than the model's {positions} positions "
            f"({model_dir / 'config.json'}); use --max-length {positions} or less"
        )

    # ---- 2. tokenizer and data ------------------------------------------------------------------
    tokenizer = _load_tokenizer(model_dir, cfg.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ModelError(f"{model_dir}: the tokenizer has neither a pad nor an eos token")
    label_field = cfg.label_field
    records = read_records(cfg.data)
    if task == "classification" and label_field is None:
        first = records[0]
        label_field = "answer" if "instruction" in first and "label" not in first else "label"
    examples, label_names, build_stats = _build_examples(task, records, tokenizer, cfg, label_field, None)
    eval_examples = None
    if cfg.eval_data is not None:
        eval_records = read_records(cfg.eval_data)
        eval_examples, _, _ = _build_examples(task, eval_records, tokenizer, cfg, label_field, label_names)
    skipped = 0
    if task == "causal-lm":  # no target left after truncation: nothing to learn, NaN mean loss
        kept = [ex for ex in examples if _has_target(ex)]
        skipped = len(examples) - len(kept)
        examples = kept
        if eval_examples is not None:
            eval_examples = [ex for ex in eval_examples if _has_target(ex)]
            if not eval_examples:
                raise DataError(f"{cfg.eval_data}: no example keeps a response token within --max-length {cfg.max_length}")
        if not examples:
            raise DataError(f"{cfg.data}: no example keeps a response token within --max-length {cfg.max_length}")
    num_examples = len(examples)
    steps_per_epoch = math.ceil(math.ceil(num_examples / cfg.batch_size) / cfg.grad_accum)
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)
    data_sha = file_digest(Path(cfg.data))
    settings = {
        "task": task, "seed": cfg.seed, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
        "warmup_ratio": cfg.warmup_ratio, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
        "max_length": cfg.max_length, "max_grad_norm": cfg.max_grad_norm,
        "train_on_prompt": cfg.train_on_prompt, "dtype": cfg.dtype,
        "label_field": label_field if task == "classification" else None,
        "text_field": cfg.text_field if task == "classification" else None,
        "num_labels": len(label_names) if label_names is not None else None,
    }

    # ---- 3. resume state --------------------------------------------------------------------------
    resumed = None
    if cfg.resume:
        resumed = _read_state(state_file)
        _check_resume(resumed.meta, settings, index.digest, data_sha, total_steps, state_file, cfg)

    # ---- 4. model, bypasses, head -----------------------------------------------------------------
    device = _pick_device(cfg.device)
    torch.manual_seed(cfg.seed)  # the head's initialisation, then dropout
    tcfg = task_config(model_dir, task, label_names=label_names, trust_remote_code=cfg.trust_remote_code)
    if getattr(tcfg, "pad_token_id", None) is None and task != "causal-lm":
        tcfg.pad_token_id = pad_id  # decoders (GPT-2) find the last token of each row by it
    model = load_model(model_dir, task, config=tcfg, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code)
    model.to(device)
    attach(model, index)  # freezes every parameter, adds fp32 deltas (zeros)
    head = _unfreeze_head(model, task)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    if cfg.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ModelError(f"{type(model).__name__} does not support gradient checkpointing")
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for _, p in named if p.dim() >= 2]  # deltas and head weights; biases are not decayed
    no_decay = [p for _, p in named if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, foreach=False,
    )
    delta_params = sum(p.numel() for n, p in named if n not in head)
    head_params = sum(p.numel() for n, p in named if n in head)

    # counters; a resume restores them with the parameters, AdamW state, RNG and position
    step, epoch, batch_pos = 0, 0, 0
    tokens = target_tokens = 0
    first_loss = last_loss = None
    if resumed is not None:
        _restore_state(resumed, named, optimizer, device, state_file)
        m = resumed.meta
        step, epoch, batch_pos = m["step"], m["epoch"], m["batch"]
        tokens, target_tokens = m["tokens"], m["target_tokens"]
        first_loss, last_loss = m["first_loss"], m["last_loss"]
    start_step = step
    last_saved = step if resumed is not None else None  # the step of the checkpoint on disk

    def checkpoint() -> str:
        nonlocal last_saved
        for n, p in named:
            if not bool(torch.isfinite(p).all()):
                raise TrainingError(f"parameter {n!r} is not finite after step {step}; not saving it")
        info = {
            "steps": step, "total_steps": total_steps, "examples": num_examples, "last_loss": last_loss,
            "base_model_type": config_dict.get("model_type", ""), "data_sha256": data_sha,
            "writer": f"neuroada-tools {__version__}", "epochs": cfg.epochs, "max_steps": cfg.max_steps,
            **settings,
        }
        if label_names is not None:
            info["label_names"] = list(label_names)
        sidecar = make_delta_sidecar(
            model, index, dense={n: p for n, p in named if n in head}, task=task, info=info
        )
        with atomic_file(output) as tmp:
            digest = write_delta(tmp, sidecar)
        meta = {
            "step": step, "epoch": epoch, "batch": batch_pos, "total_steps": total_steps,
            "tokens": tokens, "target_tokens": target_tokens, "first_loss": first_loss,
            "last_loss": last_loss, "index_sha256": index.digest, "data_sha256": data_sha,
            "delta_sha256": digest, "settings": settings,
        }
        _write_state(state_file, named, optimizer, meta)
        last_saved = step
        return digest

    # ---- 5. the loop ------------------------------------------------------------------------------
    model.train()
    if on_start:
        on_start(total_steps, step)
    losses: list[float] = []
    batches, batches_epoch = [], -1
    t0 = time.perf_counter()
    while step < total_steps:
        if batches_epoch != epoch:
            batches, batches_epoch = _epoch_batches(num_examples, cfg.batch_size, cfg.seed, epoch), epoch
        if batch_pos >= len(batches):
            epoch, batch_pos = epoch + 1, 0
            continue
        group = [collate([examples[i] for i in b], pad_id) for b in batches[batch_pos : batch_pos + cfg.grad_accum]]
        count = sum(_count_targets(mb, task) for mb in group)  # the loss is a mean over the whole step
        lr = _lr_at(step, total_steps, warmup_steps, cfg.lr)
        for g in optimizer.param_groups:
            g["lr"] = lr
        step_loss = 0.0
        for mb in group:
            loss_sum, _ = compute_loss(model, mb, task, device)
            loss = loss_sum / count
            if not bool(torch.isfinite(loss)):
                raise TrainingError(_nan_message("loss", step + 1, lr, output, last_saved))
            loss.backward()
            step_loss += float(loss.detach())
            tokens += int(mb["attention_mask"].sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for _, p in named], cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"), foreach=False
        )
        if not bool(torch.isfinite(grad_norm)):
            raise TrainingError(_nan_message("gradient", step + 1, lr, output, last_saved))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        batch_pos += len(group)
        target_tokens += count
        if first_loss is None:
            first_loss = step_loss
        last_loss = step_loss
        losses.append(step_loss)
        if on_step:
            on_step(StepInfo(step, total_steps, step_loss, lr))
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            checkpoint()
    seconds = time.perf_counter() - t0

    # ---- 6. final checkpoint, evaluation, summary -------------------------------------------------
    digest = checkpoint()
    eval_result = None
    if eval_examples:
        eval_result = evaluate(model, eval_examples, task, pad_id, cfg.batch_size, device)
    return TrainSummary(
        output=str(output), state=str(state_file), sha256=digest, task=task, steps=step,
        start_step=start_step, total_steps=total_steps, epochs=round(step / steps_per_epoch, 4),
        examples=num_examples, skipped_examples=skipped, truncated_examples=build_stats.truncated,
        tokens=tokens, target_tokens=target_tokens, seconds=round(seconds, 3), first_loss=first_loss,
        last_loss=last_loss, trainable_parameters=delta_params + head_params,
        delta_parameters=delta_params, head_parameters=head_params, lr=cfg.lr, seed=cfg.seed,
        device=str(device), dtype=cfg.dtype, label_names=label_names, eval=eval_result, losses=losses,
    )


# ---------------------------------------------------------------- loss and evaluation


def _model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
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
    inputs = _model_inputs(batch, device)
    labels = batch["labels"].to(device)
    if task == "causal-lm":
        logits = model(**inputs, use_cache=False).logits
        logits, labels = logits[:, :-1].float(), labels[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
        correct = ((logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)).sum()
        return loss, correct
    logits = model(**inputs).logits.float()
    if task == "multiple-choice":
        logits = logits.masked_fill(~batch["choice_mask"].to(device), float("-inf"))
    loss = F.cross_entropy(logits, labels, reduction="sum")
    return loss, (logits.argmax(-1) == labels).sum()


def _count_targets(batch: dict[str, torch.Tensor], task: str) -> int:
    if task == "causal-lm":
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return int(batch["labels"].shape[0])


def _has_target(example: dict[str, Any]) -> bool:
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
        count += _count_targets(batch, task)
    out: dict[str, Any] = {"examples": len(examples), "loss": loss_sum / max(count, 1)}
    if task == "causal-lm":
        out["target_tokens"] = count
        out["token_accuracy"] = correct / max(count, 1)
    else:
        out["accuracy"] = correct / max(count, 1)
    return out


# ---------------------------------------------------------------- schedule and data order


def _lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    """The linear schedule with warmup (see the module docstring) at 0-based ``step``."""
    if step < warmup:
        return lr * step / warmup
    return lr * max(0.0, (total - step) / max(1, total - warmup))


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The micro-batches of epoch ``epoch``: a seeded permutation of ``range(n)`` cut in pieces.

    The generator's seed is the first 8 bytes (little endian) of ``sha256(f"{seed}:{epoch}")``,
    so every (seed, epoch) pair has its own order, independent of any other random state.
    """
    g = torch.Generator()
    g.manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "little"))
    order = torch.randperm(n, generator=g).tolist()
    return [order[s : s + batch_size] for s in range(0, n, batch_size)]


# ---------------------------------------------------------------- setup helpers


def _check_options(cfg: TrainConfig) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise TrainingError(msg)

    need(cfg.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, found {cfg.dtype!r}")
    need(math.isfinite(cfg.lr) and cfg.lr > 0, f"lr must be a positive number, found {cfg.lr}")
    need(math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0, f"weight decay must be >= 0, found {cfg.weight_decay}")
    need(0 <= cfg.warmup_ratio <= 1, f"warmup ratio must be in [0, 1], found {cfg.warmup_ratio}")
    need(cfg.max_grad_norm >= 0, f"max grad norm must be >= 0, found {cfg.max_grad_norm}")
    for name in ("batch_size", "grad_accum", "max_length", "epochs"):
        need(getattr(cfg, name) >= 1, f"{name.replace('_', ' ')} must be >= 1, found {getattr(cfg, name)}")
    need(cfg.max_steps is None or cfg.max_steps >= 1, f"max steps must be >= 1, found {cfg.max_steps}")
    need(cfg.save_every >= 0, f"save every must be >= 0, found {cfg.save_every}")
    need(cfg.seed >= 0, f"seed must be >= 0, found {cfg.seed}")
    need(not (cfg.resume and cfg.force), "--resume continues the existing output; it cannot be combined with --force")


def _check_outputs(cfg: TrainConfig, model_dir: Path, output: Path, state_file: Path) -> None:
    if not output.parent.is_dir():
        raise OutputError(f"{output.parent}: output folder does not exist")
    root = model_dir.resolve()
    for path in (output, state_file):
        if path.resolve().is_relative_to(root):
            raise OutputError(f"{path}: lies inside the base model folder {model_dir}; write the delta elsewhere")
        for inp in (cfg.index, cfg.data, cfg.eval_data):
            if inp is not None and path.resolve() == Path(inp).resolve():
                raise OutputError(f"{path}: output path is an input; choose another -o")
    if cfg.resume:
        if not state_file.is_file():
            raise OutputError(f"{state_file}: no resume state to continue from (train without --resume first)")
        return
    for path in (output, state_file):
        if path.exists() and not cfg.force:
            raise OutputError(f"{path}: already exists (use --force to overwrite, or --resume to continue)")


def _load_tokenizer(model_dir: Path, trust_remote_code: bool):
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return transformers.AutoTokenizer.from_pretrained(
                str(model_dir), local_files_only=True, trust_remote_code=trust_remote_code
            )
    except Exception as e:  # transformers raises many kinds; the message is what matters
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"{model_dir}: cannot load the tokenizer ({first})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)


def _build_examples(task, records, tokenizer, cfg: TrainConfig, label_field, label_names):
    """``(examples, label names or None, BuildStats)`` for ``task``; DataError names file and line."""
    if task == "causal-lm":
        built = build_causal_lm_examples(records, tokenizer, max_length=cfg.max_length, train_on_prompt=cfg.train_on_prompt)
        return list(built), None, built.stats
    if task == "classification":
        built, names = build_classification_examples(
            records, tokenizer, max_length=cfg.max_length, label_field=label_field, text_field=cfg.text_field,
            num_labels=cfg.num_labels if label_names is None else None, label_names=label_names,
        )
        return list(built), names, built.stats
    built = build_multiple_choice_examples(records, tokenizer, max_length=cfg.max_length)
    return list(built), None, built.stats


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {name!r} asked for, but CUDA is not available")
    return device


def _unfreeze_head(model: torch.nn.Module, task: str) -> set[str]:
    """Make the task head trainable (fp32); return its parameter names.

    The head is every parameter outside the base model (``model.base_model_prefix``): for
    ``BertForSequenceClassification`` ``classifier.weight`` and ``classifier.bias``. A causal LM
    trains no head (NeuroAda leaves the LM head frozen). In a bf16 model the head modules are
    made fp32 and their inputs are cast up, so the head and its AdamW state are fp32 too.
    """
    if task == "causal-lm":
        return set()
    prefix = getattr(model, "base_model_prefix", "") + "."
    names = {n for n, _ in model.named_parameters() if not n.startswith(prefix) and "neuroada_delta" not in n}
    if not names:
        raise ModelError(f"{type(model).__name__}: no task head found outside {prefix[:-1]!r}")
    params = dict(model.named_parameters())
    for child in sorted({n.split(".")[0] for n in names}):
        module = getattr(model, child)
        if any("neuroada_delta" in n for n, _ in module.named_parameters()):
            raise ModelError(f"the index adapts a weight of the task head {child!r}; the head is trained densely")
        if any(p.is_floating_point() and p.dtype != torch.float32 for p in module.parameters()):
            module.float()
            module.register_forward_pre_hook(_inputs_to_fp32)
    for n in names:
        params[n].requires_grad_(True)
    return names


def _inputs_to_fp32(module, args):
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


# ---------------------------------------------------------------- the resume state


@dataclass
class _State:
    tensors: dict[str, torch.Tensor]
    meta: dict


def _write_state(path: Path, named, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for n, p in named:
        tensors[f"param.{n}"] = p.detach().float().cpu()
        st = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in st:
                tensors[f"adam.{key}.{n}"] = torch.as_tensor(st[key], dtype=torch.float32).detach().cpu()
    tensors["rng.cpu"] = torch.get_rng_state()
    if any(p.is_cuda for _, p in named):
        tensors["rng.cuda"] = torch.cuda.get_rng_state(named[0][1].device)
    metadata = {
        "neuroada.magic": STATE_MAGIC,
        "neuroada.version": str(STATE_VERSION),
        "neuroada.state": json.dumps(meta, sort_keys=True, separators=(",", ":")),
        "neuroada.writer": f"neuroada-tools {__version__}",
    }
    with atomic_file(path) as tmp:
        write_file(tmp, tensors, metadata)


def _read_state(path: Path) -> _State:
    header = read_header(path, TrainingError)
    label = path.name
    meta_raw = header.metadata
    if meta_raw.get("neuroada.magic") != STATE_MAGIC:
        raise TrainingError(f"{label}: not a train-sparse resume state (magic {meta_raw.get('neuroada.magic')!r})")
    if meta_raw.get("neuroada.version") != str(STATE_VERSION):
        raise TrainingError(f"{label}: unsupported resume state version {meta_raw.get('neuroada.version')!r}")
    try:
        meta = json.loads(meta_raw.get("neuroada.state", ""))
    except ValueError as e:
        raise TrainingError(f"{label}: neuroada.state is not valid JSON ({e})") from None
    need = {"step": int, "epoch": int, "batch": int, "total_steps": int, "tokens": int, "target_tokens": int,
            "settings": dict, "index_sha256": str, "data_sha256": str}
    for key, typ in need.items():
        if not isinstance(meta, dict) or not isinstance(meta.get(key), typ) or isinstance(meta.get(key), bool):
            raise TrainingError(f"{label}: neuroada.state field {key!r} missing or not {typ.__name__}")
    for key in ("step", "epoch", "batch", "tokens", "target_tokens"):
        if meta[key] < 0:
            raise TrainingError(f"{label}: neuroada.state field {key!r} is negative")
    tensors = read_all(path, header, TrainingError)
    rng = tensors.get("rng.cpu")
    if rng is None or rng.dtype != torch.uint8 or rng.dim() != 1:
        raise TrainingError(f"{label}: missing or malformed rng.cpu")
    return _State(tensors, meta)


def _check_resume(meta: dict, settings: dict, index_digest: str, data_sha: str, total_steps: int,
                  state_file: Path, cfg: TrainConfig) -> None:
    label = state_file.name
    if meta["index_sha256"] != index_digest:
        raise TrainingError(f"{label}: trained with another index (sha256 {meta['index_sha256'][:12]}...), not {cfg.index}")
    if meta["data_sha256"] != data_sha:
        raise TrainingError(f"{label}: trained on other data (sha256 {meta['data_sha256'][:12]}...), not {cfg.data}")
    saved = meta["settings"]
    for key in TRAJECTORY:
        if saved.get(key) != settings.get(key):
            raise TrainingError(
                f"{label}: cannot resume with {key} = {settings.get(key)!r}; the state was trained with {saved.get(key)!r}"
            )
    if meta["step"] >= total_steps:
        raise TrainingError(
            f"{label}: already at step {meta['step']} of {total_steps}; nothing left to train "
            "(raise --max-steps or --epochs to train further)"
        )


def _restore_state(state: _State, named, optimizer, device, state_file: Path) -> None:
    label = state_file.name
    t = state.tensors
    names = {n for n, _ in named}
    saved = {k[len("param."):] for k in t if k.startswith("param.")}
    if saved != names:
        extra = sorted(saved ^ names)[0]
        raise TrainingError(f"{label}: trainable parameter {extra!r} is in only one of the state and the model")
    with torch.no_grad():
        for n, p in named:
            value = t[f"param.{n}"]
            if tuple(value.shape) != tuple(p.shape) or value.dtype != torch.float32:
                raise TrainingError(f"{label}: param.{n} has shape {list(value.shape)} {value.dtype}, expected {list(p.shape)} fp32")
            if not bool(torch.isfinite(value).all()):
                raise TrainingError(f"{label}: param.{n} is not finite")
            p.copy_(value.to(p.dtype))
            st = {}
            for key in ("exp_avg", "exp_avg_sq"):
                v = t.get(f"adam.{key}.{n}")
                if v is None or tuple(v.shape) != tuple(p.shape):
                    raise TrainingError(f"{label}: adam.{key}.{n} missing or of the wrong shape")
                st[key] = v.to(device=p.device, dtype=p.dtype).clone()
            s = t.get(f"adam.step.{n}")
            if s is None or s.dim() != 0:
                raise TrainingError(f"{label}: adam.step.{n} missing or not a scalar")
            st["step"] = s.clone()
            optimizer.state[p] = st
    torch.set_rng_state(t["rng.cpu"].clone())
    if "rng.cuda" in t and device.type == "cuda":
        torch.cuda.set_rng_state(t["rng.cuda"].clone(), device)


def _nan_message(what: str, step: int, lr: float, output: Path, last_saved: int | None) -> str:
    kept = (
        f"the last good checkpoint (step {last_saved}) is kept at {output}"
        if last_saved is not None
        else "no checkpoint was written yet (--save-every N keeps intermediate ones)"
    )
    return f"the {what} became NaN or infinite at step {step} (lr {lr:.3g}); training stopped, {kept}"
