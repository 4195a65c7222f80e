"""Train the NeuroAda deltas of a model with ``NeuroAdaTrainer``: in-process (one process) or as the
script torchrun starts (DDP on gloo), so that ``tests/test_adapters_trainer.py`` can compare them.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/adapters_ddp.py \\
        MODEL_DIR INDEX OUT_DELTA PER_DEVICE_BATCH STEPS
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

EXAMPLES = 16
LENGTH = 12


def examples() -> list[dict]:
    """Fixed-length token rows (no padding: every rank sees the same token count per example)."""
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, 300, (EXAMPLES, LENGTH), generator=g)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]


def run(model_dir: str, index: str, out_dir: str, batch: int, steps: int, *, save_steps: int | None = None,
        resume: str | None = None, evaluate: bool = False, **extra):
    """Apply ``index`` to the model of ``model_dir`` and train ``steps`` steps; return the trainer."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    import neuroada_tools

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    neuroada_tools.apply(model, index)
    settings = dict(
        max_steps=steps, per_device_train_batch_size=batch, learning_rate=2e-2, warmup_steps=0,
        lr_scheduler_type="linear", weight_decay=0.0, seed=0, report_to=[], disable_tqdm=True, use_cpu=True,
        logging_strategy="no", save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        dataloader_num_workers=0,
    )
    args = TrainingArguments(out_dir, **{**settings, **extra})
    trainer = neuroada_tools.NeuroAdaTrainer(model=model, args=args, train_dataset=examples(),
                                             eval_dataset=examples()[:4] if evaluate else None)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def main(argv: list[str]) -> None:
    model_dir, index, out, batch, steps = argv
    torch.set_num_threads(1)
    trainer = run(model_dir, index, str(Path(out).parent / "run"), int(batch), int(steps))
    ddp = trainer.model_wrapped
    if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):  # only deltas in DDP's reducer
        ignored = set(ddp.parameters_to_ignore)
        for n, p in trainer.model.named_parameters():
            if (n in ignored) == p.requires_grad or (p.requires_grad and not n.endswith(".neuroada_delta")):
                raise SystemExit(f"rank {trainer.args.process_index}: DDP should reduce only the deltas, not {n}")
    if trainer.args.should_save:
        import neuroada_tools

        neuroada_tools.save_delta(trainer.model, out)
    from neuroada_tools.train.distributed import leave_group

    leave_group()  # together: see train/distributed.finish


if __name__ == "__main__":
    main(sys.argv[1:])
