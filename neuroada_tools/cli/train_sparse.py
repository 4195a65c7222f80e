"""``neuroada-tools train-sparse``: parse options, call ``train.train``, print the summary."""

from __future__ import annotations

from pathlib import Path

import click

from neuroada_tools.cli.common import emit, handle_errors, progress_bar

EPILOG = """\b
Example:
  neuroada-tools index ./Llama-3.2-1B -k 20 -o llama.k20.index.safetensors
  neuroada-tools train-sparse --model ./Llama-3.2-1B --index llama.k20.index.safetensors \\
      --data boolq/train.json --lr 7e-4 --epochs 3 --batch-size 16 --dtype bf16 -o boolq.delta.safetensors
  neuroada-tools train-sparse --model ./bert-base --index bert.k4.index.safetensors \\
      --data sst2.jsonl --eval-data sst2-dev.jsonl --task classification -o sst2.delta.safetensors
"""

_PATH = click.Path(path_type=Path)


@click.command("train-sparse", epilog=EPILOG)
@click.option("--model", required=True, type=_PATH, help="Base model folder (config.json, safetensors, tokenizer).")
@click.option("--index", "index", required=True, type=_PATH, help="Index sidecar made from this model (neuroada-tools index).")
@click.option("--data", required=True, type=_PATH,
              help="Training data: JSON list or JSONL of instruction records (instruction, input, output), "
                   "{\"text\": ...} records, or classification records (text + label).")
@click.option("-o", "--output", required=True, type=_PATH,
              help="Delta sidecar to write (*.delta.safetensors); the resume state is written beside it "
                   "(NAME.state.safetensors).")
@click.option("--task", type=click.Choice(["causal-lm", "classification", "multiple-choice"]), default=None,
              help="Default: from the config (causal-lm for decoders, classification for encoders).")
@click.option("--num-labels", type=click.IntRange(min=1), default=None,
              help="Classification: number of classes (default: from the data's labels).")
@click.option("--label-field", default=None, metavar="FIELD",
              help="Classification: record field holding the label (default 'label'; 'answer' for instruction data).")
@click.option("--text-field", default=None, metavar="FIELD",
              help="Classification: record field holding the text (default 'text'; instruction [+ input] for instruction data).")
@click.option("--eval-data", type=_PATH, default=None, help="Evaluate on this file at the end: loss, and accuracy for classification.")
@click.option("--lr", type=float, default=7e-4, show_default=True, help="Peak learning rate (paper: 7e-4 at k=20, 9e-3 at k=1).")
@click.option("--weight-decay", type=float, default=0.0, show_default=True, help="AdamW weight decay (deltas and head weights).")
@click.option("--warmup-ratio", type=float, default=0.06, show_default=True, help="Share of the steps with linear warmup; then linear decay to 0.")
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True, help="Passes over the data (unless --max-steps).")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Optimizer steps to train; overrides --epochs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Examples per micro-batch.")
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--max-length", type=click.IntRange(min=1), default=256, show_default=True, help="Cut longer examples to this many tokens.")
@click.option("--max-grad-norm", type=click.FloatRange(min=0), default=1.0, show_default=True, help="Clip the gradient norm (0: no clipping).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed for data order, head initialisation and dropout.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="Dtype to load the base model in; deltas, head and optimizer state are fp32 always.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available), cpu, cuda or cuda:N.")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in backward to save memory.")
@click.option("--save-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Write the delta and resume state every N steps (0: only at the end).")
@click.option("--resume", is_flag=True, help="Continue from the resume state beside -o (same data and settings).")
@click.option("--train-on-prompt", is_flag=True, help="Causal LM: train on the prompt tokens too (default: response only).")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model folder's own Python code (off by default).")
@click.option("--force", is_flag=True, help="Overwrite an existing delta sidecar and resume state.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@handle_errors
def command(model, index, data, output, task, num_labels, label_field, text_field, eval_data, lr, weight_decay,
            warmup_ratio, epochs, max_steps, batch_size, grad_accum, max_length, max_grad_norm, seed, dtype, device,
            gradient_checkpointing, save_every, resume, train_on_prompt, trust_remote_code, force, as_json,
            quiet) -> None:
    """Train NeuroAda deltas (and a classification head) of MODEL on DATA; write a delta sidecar.

    Only the bypass deltas selected by the index (and, for classification or multiple choice,
    the task head) are trained; the base checkpoint is never written. The index must have been
    made from this very model: a different base is refused, naming the tensor. Data errors are
    reported with the file and line before training starts. Causal-LM instruction data uses the
    Alpaca / LLM-Adapters prompt template and trains on the response only.
    """
    from neuroada_tools.train.loop import TrainConfig, train

    if num_labels is not None and task not in (None, "classification"):
        raise click.UsageError("--num-labels only applies to --task classification")
    cfg = TrainConfig(
        model=model, index=index, data=data, output=output, task=task, num_labels=num_labels,
        label_field=label_field, text_field=text_field, eval_data=eval_data, lr=lr, weight_decay=weight_decay,
        warmup_ratio=warmup_ratio, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
        grad_accum=grad_accum, max_length=max_length, max_grad_norm=max_grad_norm, seed=seed, dtype=dtype,
        device=device, gradient_checkpointing=gradient_checkpointing, save_every=save_every, resume=resume,
        train_on_prompt=train_on_prompt, trust_remote_code=trust_remote_code, force=force,
    )
    with progress_bar(quiet, "train", unit="step") as (set_total, advance, bar):

        def on_start(total: int, start: int) -> None:
            set_total(total)
            if start:
                advance(start)

        def on_step(info) -> None:
            advance(1)
            bar.set_postfix(loss=f"{info.loss:.4f}", lr=f"{info.lr:.2e}", refresh=False)

        summary = train(cfg, on_start=on_start, on_step=on_step)
    emit(summary.to_dict(), as_json, _human)


def _human(s: dict) -> str:
    def loss(v) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    resumed = f" (resumed at step {s['start_step']})" if s["start_step"] else ""
    lines = [
        f"wrote {s['output']} and {s['state']}",
        f"  task {s['task']}: {s['steps']} steps{resumed}, {s['epochs']:g} epoch(s) of {s['examples']} examples, "
        f"{s['tokens']:,} tokens in {s['seconds']:.1f} s",
        f"  loss {loss(s['first_loss'])} -> {loss(s['last_loss'])}",
        f"  trainable parameters: {s['trainable_parameters']:,} ({s['delta_parameters']:,} deltas"
        + (f" + {s['head_parameters']:,} head)" if s["head_parameters"] else ")"),
    ]
    if s["truncated_examples"]:
        lines.append(f"  {s['truncated_examples']} examples cut to --max-length")
    if s["skipped_examples"]:
        lines.append(f"  skipped {s['skipped_examples']} examples whose response lies beyond --max-length")
    if s["eval"]:
        e = s["eval"]
        acc = f", accuracy {e['accuracy']:.4f}" if "accuracy" in e else ""
        lines.append(f"  eval: loss {e['loss']:.4f}{acc} on {e['examples']} examples")
    return "\n".join(lines)
