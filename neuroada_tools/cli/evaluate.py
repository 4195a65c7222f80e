"""``neuroada-tools evaluate``: accuracy of any form of the model over a data file with references."""

from __future__ import annotations

from pathlib import Path

import click

from neuroada_tools.cli.common import emit, handle_errors, progress_bar

EPILOG = """\b
Examples:
  neuroada-tools evaluate --merged ./merged --data arc-easy/test.json --scoring generate --limit 50
  neuroada-tools evaluate --model ./base --data arc-easy/test.json --scoring loglik \\
      --prompt-style lm-eval --skip 1976 --predictions preds.jsonl --json
  neuroada-tools evaluate --model ./base --index base.k20.index.safetensors \\
      --delta boolq.delta.safetensors --data boolq/test.json
  neuroada-tools evaluate --onnx ./merged-onnx --with-past --data boolq/test.json --limit 200
"""


@click.command("evaluate", epilog=EPILOG)
@click.option("--model", type=click.Path(path_type=Path), default=None,
              help="Base model folder: alone (zero-shot), or with --index and --delta (base + bypass).")
@click.option("--index", type=click.Path(path_type=Path), default=None, help="Index sidecar.")
@click.option("--delta", type=click.Path(path_type=Path), default=None, help="Delta sidecar.")
@click.option("--merged", type=click.Path(path_type=Path), default=None, help="Merged safetensors folder.")
@click.option("--onnx", "onnx_dir", type=click.Path(path_type=Path), default=None, help="ONNX folder.")
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="JSON list or JSONL of records with references (instruction, options, or text + label).")
@click.option("--scoring", type=click.Choice(["generate", "loglik"]), default="generate", show_default=True,
              help="Greedy generation + answer extraction, or option log-likelihood (acc, acc_norm). "
                   "Classification records are scored by the classifier's argmax either way.")
@click.option("--template", type=click.Choice(["alpaca", "chat"]), default="alpaca", show_default=True,
              help="Instruction records' prompt template, rendered as train-sparse renders it (chat: the "
                   "tokenizer's chat template). Conversational and prompt-completion records always use theirs.")
@click.option("--prompt-style", type=click.Choice(["template", "lm-eval"]), default="template", show_default=True,
              help="loglik: the training prompt then the option text, or lm-eval's "
                   "'Question: {q}\\nAnswer:' + ' {option}'.")
@click.option("--rule", type=click.Choice(["boolq", "choice", "piqa", "hellaswag", "winogrande", "number",
                                           "letter", "exact"]), default=None,
              help="generate: the answer-extraction rule (default: detected from the references).")
@click.option("--skip", type=click.IntRange(min=0), default=0, show_default=True, help="Leave out the first N records.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Score at most N records (after --skip).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Prompts decoded together, or sequences per forward for loglik on ONNX forms (torch forms "
                   "score an item's options together on one forward of its context).")
@click.option("--device", default=None, help="torch device for torch forms (cpu, cuda, cuda:1; default: cpu).")
@click.option("--with-past", is_flag=True, help="ONNX generation: decode with model_with_past.onnx.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="ONNX Runtime provider.")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
              help="Tokenizer folder (default: the model's own folder).")
@click.option("--predictions", type=click.Path(path_type=Path), default=None,
              help="Write one JSON line per example (prompt, generation or option scores, answer, reference).")
@click.option("--json", "as_json", is_flag=True, help="The summary as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@handle_errors
def command(model, index, delta, merged, onnx_dir, data, scoring, template, prompt_style, rule, skip, limit,
            max_new_tokens, batch_size, device, with_past, provider, tokenizer, predictions, as_json, quiet) -> None:
    """Score a data file with references: accuracy with a 95% Wilson interval, unparsed answers.

    Works on the base alone (zero-shot), base + bypass, a merged folder or an ONNX folder.
    """
    from neuroada_tools.evaluate.run import EvalSettings, ModelArgs, human, run_evaluate

    if sum([model is not None, merged is not None, onnx_dir is not None]) != 1:
        raise click.UsageError("give one model: --model (with --index and --delta for base + bypass), --merged, "
                               "or --onnx")
    if (index is None) != (delta is None) or (index is not None and model is None):
        raise click.UsageError("--index and --delta go together, with --model")
    if with_past and onnx_dir is None:
        raise click.UsageError("--with-past is for --onnx")
    if rule is not None and scoring != "generate":
        raise click.UsageError("--rule is for --scoring generate")
    settings = EvalSettings(Path(data), scoring, template, prompt_style, rule, skip, limit, max_new_tokens,
                            batch_size, device, with_past, provider, tokenizer, predictions)
    args = ModelArgs(model, index, delta, merged, onnx_dir)
    with progress_bar(quiet, "evaluate", unit="seq") as (set_total, advance, _):
        def progress(total: int, _unused: int):
            set_total(total)
            return advance

        summary, _ = run_evaluate(settings, args, progress=progress)
    emit(summary, as_json, human)
