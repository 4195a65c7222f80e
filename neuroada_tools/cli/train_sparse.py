"""``neuroada-tools train-sparse``: options from ``TrainConfig``'s fields, then ``train()``, then the summary."""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Callable
from pathlib import Path

import click

from neuroada_tools.cli.common import emit, handle_errors, progress_bar
from neuroada_tools.train.config import TrainConfig

EPILOG = """\b
Example:
  neuroada-tools index ./Llama-3.2-1B -k 20 -o llama.k20.index.safetensors
  neuroada-tools train-sparse --model ./Llama-3.2-1B --index llama.k20.index.safetensors \\
      --data boolq/train.json --lr 7e-4 --epochs 3 --batch-size 16 --dtype bf16 -o boolq.delta.safetensors
  neuroada-tools train-sparse --model ./SmolLM2-135M-Instruct --index smollm2.k1.index.safetensors \\
      --data chat.jsonl --lr 9e-3 --max-steps 300 -o chat.delta.safetensors
  neuroada-tools train-sparse --model ./bert-base --index bert.k4.index.safetensors \\
      --data sst2.jsonl --eval-data sst2-dev.jsonl --task classification -o sst2.delta.safetensors
"""



def config_options(fn: Callable) -> Callable:
    """One click option per ``TrainConfig`` field, from the field's metadata (``train/config.py``)."""
    hints = typing.get_type_hints(TrainConfig)
    for f in reversed(dataclasses.fields(TrainConfig)):
        meta = f.metadata
        flags = meta["option"].split("/")
        kind = hints[f.name]
        base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
        required = f.default is dataclasses.MISSING
        kw: dict = {"help": meta["help"], "required": required}
        if base is bool:
            kw["is_flag"] = True
        else:
            if "choices" in meta:
                kw["type"] = click.Choice(list(meta["choices"]))
            elif base is Path:
                kw["type"] = click.Path(path_type=Path)
            elif base is int:
                kw["type"] = click.IntRange(min=meta["min"]) if "min" in meta else int
            elif base is float:
                kw["type"] = click.FloatRange(min=meta["min"]) if "min" in meta else float
            if not required:
                kw["default"] = f.default
            if meta.get("show_default"):
                kw["show_default"] = True
            if "metavar" in meta:
                kw["metavar"] = meta["metavar"]
        fn = click.option(*flags, f.name, **kw)(fn)
    return fn


@click.command("train-sparse", epilog=EPILOG)
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@handle_errors
def command(as_json: bool, quiet: bool, **options) -> None:
    """Train NeuroAda deltas (and a classification head) of MODEL on DATA; write a delta sidecar.

    Only the bypass deltas selected by the index (and, for classification or multiple choice,
    the task head) are trained; the base checkpoint is never written. The index must have been
    made from this very model: a different base is refused, naming the tensor. Data errors are
    reported with the file and line before training starts. Causal-LM instruction data uses the
    Alpaca / LLM-Adapters prompt template (or, with --template chat, the tokenizer's chat template)
    and trains on the response only; conversational data (TRL's "messages") is rendered with the
    chat template and trains on the assistant turns, prompt-completion data on the completion.
    """
    from neuroada_tools.train.loop import train

    if options["num_labels"] is not None and options["task"] not in (None, "classification"):
        raise click.UsageError("--num-labels only applies to --task classification")
    cfg = TrainConfig(**options)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 prints
    with progress_bar(quiet or not main_rank, "train", unit="step") as (set_total, advance, bar):

        def on_start(total: int, start: int) -> None:
            set_total(total)
            if start:
                advance(start)

        def on_step(info) -> None:
            advance(1)
            bar.set_postfix(loss=f"{info.loss:.4f}", lr=f"{info.lr:.2e}", refresh=False)

        summary = train(cfg, on_start=on_start, on_step=on_step)
    if main_rank:
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
    if s.get("quantization"):
        q = s["quantization"]
        lines.append(f"  frozen base: {q['layers']} Linear layers {q['scheme']}-quantized "
                     f"({q['library']} {q['version']}), {q['quantized_bytes'] / 2**20:.1f} MiB")
    if s["truncated_examples"]:
        lines.append(f"  {s['truncated_examples']} examples cut to --max-length")
    if s["skipped_examples"]:
        lines.append(f"  skipped {s['skipped_examples']} examples whose response lies beyond --max-length")
    if s["eval"]:
        e = s["eval"]
        acc = f", accuracy {e['accuracy']:.4f}" if "accuracy" in e else ""
        lines.append(f"  eval: loss {e['loss']:.4f}{acc} on {e['examples']} examples")
    return "\n".join(lines)
