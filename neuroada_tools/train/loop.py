"""The NeuroAda training loop: train the bypass deltas (and a task head) of a Hugging Face model.

``train(TrainConfig(...))`` reads top to bottom, as the ``train-sparse`` command runs it:

1. check the output paths, read the index sidecar and check its shapes against the base
   checkpoint's headers;
2. pick the task (``causal-lm`` for decoders, ``classification`` for encoders, or as asked),
   load the tokenizer, and read and tokenize the training (and eval) data: every bad record is
   a ``DataError`` naming the file and line, raised before the model is even loaded;
3. with ``resume``, read the resume state and check it was made by the same settings;
4. load the model with transformers, verify the index's fingerprints on the loaded weights
   (``verify_loaded``: the base is read once; a sidecar made from another base is refused, naming
   a tensor), attach the bypasses, unfreeze the task head (classification and multiple choice:
   the parameters outside the base model, e.g. ``classifier.*``);
5. the loop: AdamW over the trainable parameters, a linear schedule with warmup, gradient
   accumulation, gradient clipping, a checkpoint every ``save_every`` steps;
6. the final checkpoint, the evaluation on ``eval_data``, and a ``TrainSummary``.

The loss, the schedule and the data order: ``train/steps.py``.

Outputs. Exactly two files, each written to a temporary name beside it and renamed into place:
the delta sidecar at ``output`` (``formats/delta-v1.md``: the deltas, the trained head under
``dense.<task-model parameter name>``, ``task``, and ``info``: the training settings, label
names, steps and last loss) and the resume state at ``state_path(output)``
(``boolq.delta.safetensors`` -> ``boolq.state.safetensors``). Both are written at every
checkpoint and at the end; nothing is ever written to the model folder. The same seed, data and
settings give byte-identical files (on CPU, for a given torch thread count: the SDDMM adds its
threads' partial sums in a fixed order; some CUDA kernels are not deterministic).

The resume state: ``io/state.py`` and ``formats/state-v1.md``; resuming: ``train/resume.py``.

A loss or gradient that is NaN or infinite stops training with ``TrainingError``; the files of
the last checkpoint stay as they were (a checkpoint is never written with non-finite values).

Several processes under ``torchrun`` (DDP, or FSDP2 with ``--fsdp``): ``train/distributed.py``.

``quantize`` (QLoRA-style): the Linear layers of the loaded base are quantized after its
fingerprints are checked (``train/bypass/quant.py``), their bypasses add ``x S^T`` to the quantized
forward, and the delta sidecar's ``info.quantization`` records the scheme; ``merge`` writes the
deltas into the full-precision checkpoint as for any delta.

Left out: mixed precision with fp32 master weights (``bf16``
loads the base in bf16; deltas, head and their AdamW state are fp32 anyway), sequence packing,
evaluation during training (``eval_data`` is evaluated once, at the end), early stopping.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from neuroada_tools import __version__, hf
from neuroada_tools.check.binding import check_shapes, verify_loaded
from neuroada_tools.errors import ModelError, OptionError, TrainingError
from neuroada_tools.hf import TASKS, default_task, load_model
from neuroada_tools.io.checkpoint import open_checkpoint
from neuroada_tools.io.outputs import atomic_file, check_delta_outputs
from neuroada_tools.io.sidecar import file_digest, read_index, write_delta
from neuroada_tools.io.state import read_state, state_path, write_state
from neuroada_tools.train import distributed
from neuroada_tools.train.bypass import attach, make_delta_sidecar, quant
from neuroada_tools.train.config import StepInfo, TrainConfig, TrainSummary
from neuroada_tools.train.data import collate
from neuroada_tools.train.resume import check_resume, restore_state
from neuroada_tools.train.setup import (
    enable_checkpointing,
    pick_device,
    prepare_data,
    resolve_max_length,
    task_model_config,
    unfreeze_head,
)
from neuroada_tools.train.steps import (
    NonFinite,
    compute_loss,
    epoch_order,
    evaluate,
    lr_at,
    make_optimizer,
    nan_message,
    optimizer_step,
    placeholder,
    steps_per_epoch,
    warmup_steps,
)

__all__ = ["StepInfo", "TrainConfig", "TrainSummary", "compute_loss", "evaluate", "state_path", "train"]


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
    when the loss becomes NaN or a resume state does not fit. Under torchrun every rank calls it
    (``train/distributed.py``) and gets the callbacks (the CLI shows a bar on rank 0 only).
    """
    cfg.check()
    dist = distributed.start(cfg.fsdp, cfg.dist_timeout, cfg.device)
    try:
        result = _train(cfg, dist, on_start, on_step)
    except BaseException:
        distributed.finish(dist)  # a peer may be gone: no barrier
        raise
    distributed.finish(dist, together=True)
    return result


def _model_digest(ckpt) -> str:
    """What the ranks compare of the model folder: config.json and every tensor's name, dtype and
    shape (the adapted tensors' values are bound to the index by its fingerprints)."""
    h = hashlib.sha256(json.dumps(ckpt.config or {}, sort_keys=True).encode())
    for name in sorted(ckpt.tensors):
        raw = ckpt.tensors[name].raw
        h.update(f"{name}:{raw.dtype}:{list(raw.shape)};".encode())
    return h.hexdigest()


def _train(cfg: TrainConfig, dist: distributed.Dist, on_start, on_step) -> TrainSummary:
    model_dir, output, state_file = Path(cfg.model), Path(cfg.output), state_path(cfg.output)
    if distributed.restarted() and not cfg.resume and state_file.is_file():  # torchrun --max-restarts
        cfg = dataclasses.replace(cfg, resume=True, force=False)
    error: BaseException | None = None
    try:  # every rank does steps 1-4; a failure anywhere stops every rank before training
        # ---- 1. outputs, index and base --------------------------------------------------------
        if not model_dir.is_dir():
            raise ModelError(f"{model_dir}: not a model folder (--model takes the folder with config.json)")
        if dist.is_main:
            check_delta_outputs(output, state_file, model_dir, (cfg.index, cfg.data, cfg.eval_data),
                                force=cfg.force, resume=cfg.resume)
        index = read_index(cfg.index)
        ckpt = open_checkpoint(model_dir)
        check_shapes(index, ckpt)  # headers only; the fingerprints are compared once the weights are loaded
        config_dict = ckpt.config or {}
        task = cfg.task or default_task(config_dict)
        if task not in TASKS:
            raise ModelError(f"unknown task {task!r} (choose {', '.join(TASKS)})")
        cfg = dataclasses.replace(cfg, max_length=resolve_max_length(cfg.max_length, config_dict, model_dir))

        # ---- 2. tokenizer and data -------------------------------------------------------------
        prep = prepare_data(cfg, task, model_dir)
        examples, eval_examples, label_names = prep.examples, prep.eval_examples, prep.label_names
        num_examples = len(examples)
        micro = cfg.batch_size * dist.world  # examples per global micro-batch
        step_examples = micro * cfg.grad_accum  # the global batch
        epoch_steps = steps_per_epoch(num_examples, micro, cfg.grad_accum)
        total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * epoch_steps
        warmup = warmup_steps(total_steps, cfg.warmup_ratio)
        data_sha = file_digest(Path(cfg.data))
        settings = {
            "task": task, "seed": cfg.seed, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
            "warmup_ratio": cfg.warmup_ratio, "global_batch": step_examples, "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum, "world_size": dist.world, "max_length": cfg.max_length,
            "max_grad_norm": cfg.max_grad_norm, "train_on_prompt": cfg.train_on_prompt, "dtype": cfg.dtype,
            "template": cfg.template,
            "quantize": cfg.quantize,
            "label_field": prep.label_field if task == "classification" else None,
            "text_field": cfg.text_field if task == "classification" else None,
            "num_labels": len(label_names) if label_names is not None else None,
        }

        # ---- 3. resume state -------------------------------------------------------------------
        resumed = None
        if cfg.resume:
            resumed = read_state(state_file)
            check_resume(resumed.meta, settings, index.digest, data_sha, total_steps, state_file, cfg)

        # ---- 4. model, bypasses, head ----------------------------------------------------------
        device = distributed.device_of(dist, pick_device(cfg.device))
        torch.manual_seed(cfg.seed)  # the head's initialisation, then dropout
        tcfg = task_model_config(model_dir, task, prep, trust_remote_code=cfg.trust_remote_code)
        model = load_model(model_dir, task, config=tcfg, dtype=hf.DTYPES[cfg.dtype],
                           trust_remote_code=cfg.trust_remote_code)
        verify_loaded(index, model, ckpt)  # FingerprintError naming the tensor if the index is from another base
        quantization = None
        if cfg.quantize:  # after the fingerprints (full precision); the bypass then adds x S^T (bypass/quant.py)
            if dist.enabled:
                raise OptionError("--quantize is not supported under torchrun (DDP / FSDP2); train on one process")
            layers = quant.quantize_model(model, cfg.quantize, device=device)
            quantization = {
                "scheme": cfg.quantize, "library": quant.QUANTIZATIONS[cfg.quantize][1],
                "version": quant.library_version(cfg.quantize), "layers": len(layers),
                "quantized_bytes": sum(quant.layer_bytes(model.get_submodule(n)) for n in layers),
            }
    except Exception as e:  # noqa: BLE001 - handed to every rank by agree, which re-raises it
        error = e
    distributed.agree(dist, error)
    distributed.same_everywhere(dist, {"index": index.digest, "data file": data_sha,
                                       "model folder": _model_digest(ckpt)})

    model.to(device)
    attach(model, index, mode="sparse" if dist.fsdp else "fused")  # freezes every parameter; fp32 zero deltas
    head = unfreeze_head(model, task)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    bypassed = [m for m in model.modules() if hasattr(m, "neuroada_delta")]
    runner = distributed.wrap(model, dist, device)  # DDP, FSDP2 (shards model in place), or model
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = make_optimizer(params, cfg.lr, cfg.weight_decay)
    base_bytes = sum(distributed.local_bytes(p) for p in model.parameters() if not p.requires_grad)
    delta_params = sum(p.numel() for n, p in named if n not in head)
    head_params = sum(p.numel() for n, p in named if n in head)

    # counters; a resume restores them with the parameters, AdamW state, RNG and position
    step, epoch, position = 0, 0, 0  # position: examples of this epoch's order already trained on
    tokens = target_tokens = 0
    first_loss = last_loss = None
    if resumed is not None:
        restore_state(resumed, named, optimizer, device, state_file)
        m = resumed.meta
        step, epoch, tokens, target_tokens = m["step"], m["epoch"], m["tokens"], m["target_tokens"]
        position = m.get("position", m["batch"] * m["settings"].get("batch_size", cfg.batch_size))
        first_loss, last_loss = m["first_loss"], m["last_loss"]
    start_step = step
    last_saved = step if resumed is not None else None  # the step of the checkpoint on disk

    def checkpoint() -> str:
        nonlocal last_saved
        distributed.barrier(dist)  # every rank has finished this step
        whole = [(n, distributed.full(p.detach())) for n, p in named]  # FSDP2: gathered on every rank
        adam = {n: {k: distributed.full(v) for k, v in optimizer.state.get(p, {}).items()} for n, p in named}
        values = {m.neuroada_name: distributed.full(m.neuroada_delta.detach()) for m in bypassed}
        digest = ""
        if dist.is_main:
            for n, p in whole:
                if not bool(torch.isfinite(p).all()):
                    raise TrainingError(f"parameter {n!r} is not finite after step {step}; not saving it")
            info = {
                "steps": step, "total_steps": total_steps, "examples": num_examples, "last_loss": last_loss,
                "base_model_type": config_dict.get("model_type", ""), "data_sha256": data_sha,
                "writer": f"neuroada-tools {__version__}", "epochs": cfg.epochs, "max_steps": cfg.max_steps,
                **settings,
            }
            if quantization is not None:  # what the deltas were trained over (formats/delta-v1.md)
                info["quantization"] = {k: quantization[k] for k in ("scheme", "library", "version")}
            if label_names is not None:
                info["label_names"] = list(label_names)
            sidecar = make_delta_sidecar(model, index, dense={n: p for n, p in whole if n in head}, task=task,
                                         info=info, values=values)
            with atomic_file(output) as tmp:
                digest = write_delta(tmp, sidecar)
            meta = {
                "step": step, "epoch": epoch, "batch": -(-position // micro), "position": position,
                "total_steps": total_steps, "tokens": tokens, "target_tokens": target_tokens,
                "first_loss": first_loss, "last_loss": last_loss, "index_sha256": index.digest,
                "data_sha256": data_sha, "delta_sha256": digest, "settings": settings,
            }
            write_state(state_file, whole, None, meta, adam=adam)
        distributed.barrier(dist)  # nobody goes on (or exits) before the files are in place
        last_saved = step
        return digest

    # ---- 5. the loop ------------------------------------------------------------------------------
    model.train()
    if on_start:
        on_start(total_steps, step)
    losses: list[float] = []
    order, order_epoch = [], -1
    t0 = time.perf_counter()
    while step < total_steps:
        if order_epoch != epoch:
            order, order_epoch = epoch_order(num_examples, cfg.seed, epoch), epoch
        if position >= num_examples:
            epoch, position = epoch + 1, 0
            continue
        chunk = order[position : position + step_examples]
        group = []  # this rank's share of each global micro-batch of the step
        for s in range(0, len(chunk), micro):
            mine = distributed.share(chunk[s : s + micro], dist)
            group.append(collate([examples[i] for i in mine], prep.pad_id) if mine
                         else placeholder(examples[chunk[s]], prep.pad_id))  # an empty share: weighs 0
        lr = lr_at(step, total_steps, warmup, cfg.lr)
        try:
            result = optimizer_step(runner, params, optimizer, group, task, device, lr, cfg.max_grad_norm,
                                    dist=dist)
        except NonFinite as e:
            raise TrainingError(nan_message(e.what, step + 1, lr, output, last_saved)) from None
        step += 1
        position += len(chunk)
        tokens += result.tokens
        target_tokens += result.targets
        if first_loss is None:
            first_loss = result.loss
        last_loss = result.loss
        losses.append(result.loss)
        if on_step:
            on_step(StepInfo(step, total_steps, result.loss, lr))
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            checkpoint()
    seconds = time.perf_counter() - t0

    # ---- 6. final checkpoint, evaluation, summary -------------------------------------------------
    digest = checkpoint()
    eval_result = None
    if eval_examples and (dist.is_main or dist.fsdp):  # FSDP2: every rank runs the sharded model
        eval_result = evaluate(model, eval_examples, task, prep.pad_id, cfg.batch_size, device)
    return TrainSummary(
        output=str(output), state=str(state_file), sha256=digest, task=task, steps=step,
        start_step=start_step, total_steps=total_steps, epochs=round(step / epoch_steps, 4),
        examples=num_examples, skipped_examples=prep.skipped, truncated_examples=prep.stats.truncated,
        tokens=tokens, target_tokens=target_tokens, seconds=round(seconds, 3), first_loss=first_loss,
        last_loss=last_loss, trainable_parameters=delta_params + head_params,
        delta_parameters=delta_params, head_parameters=head_params, lr=cfg.lr, seed=cfg.seed,
        device=str(device), dtype=cfg.dtype, world_size=dist.world, batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum, global_batch=step_examples, base_bytes=base_bytes, label_names=label_names,
        quantization=quantization,
        eval=eval_result,
        losses=losses,
    )
