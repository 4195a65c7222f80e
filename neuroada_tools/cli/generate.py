"""``neuroada-tools generate``: text from the unmerged model, a merged folder or an ONNX folder."""

from __future__ import annotations

from pathlib import Path

import click

from neuroada_tools.cli.common import emit, handle_errors, progress_bar

EPILOG = """\b
Examples:
  neuroada-tools generate --merged ./merged --prompt "The capital of France is" --max-new-tokens 20
  neuroada-tools generate --model ./base --index base.k20.index.safetensors \\
      --delta task.delta.safetensors --prompts prompts.jsonl --json
  neuroada-tools generate --onnx ./merged-onnx --with-past --prompt "Once upon a time" \\
      --temperature 0.8 --top-k 40 --seed 1
"""


@click.command("generate", epilog=EPILOG)
@click.option("--model", type=click.Path(path_type=Path), default=None,
              help="Base model folder (with --index and --delta: base + bypass).")
@click.option("--index", type=click.Path(path_type=Path), default=None, help="Index sidecar.")
@click.option("--delta", type=click.Path(path_type=Path), default=None, help="Delta sidecar.")
@click.option("--merged", type=click.Path(path_type=Path), default=None, help="Merged safetensors folder.")
@click.option("--onnx", "onnx_dir", type=click.Path(path_type=Path), default=None,
              help="ONNX folder (torch export), or an ORT GenAI folder (merge --to onnx: run on its runtime).")
@click.option("--with-past", is_flag=True,
              help="ONNX: decode with model_with_past.onnx and its KV cache (default: re-run model.onnx per token).")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="ONNX Runtime provider.")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
              help="Tokenizer folder (default: the model's own folder).")
@click.option("--prompt", default=None, help="One prompt.")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help='A file of prompts: one per line, or JSONL with "prompt".')
@click.option("--template", type=click.Choice(["plain", "alpaca", "chat"]), default="plain", show_default=True,
              help="plain: the prompt as it is; alpaca or chat: the prompt is an instruction, rendered as "
                   "train-sparse --template renders it (chat: a user turn of the tokenizer's chat template).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0 is greedy; above 0 samples from softmax(logits / temperature).")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Sample among the k most likely tokens (0: all). Needs --temperature > 0.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Prompts decoded together (left-padded).")
@click.option("--json", "as_json", is_flag=True, help="Prompts, token ids and texts as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@handle_errors
def command(model, index, delta, merged, onnx_dir, with_past, provider, tokenizer, prompt, prompts_file, template,
            max_new_tokens, temperature, top_k, seed, batch_size, as_json, quiet) -> None:
    """Generate text, greedy by default, from base + bypass, a merged folder or an ONNX folder.

    Decodes step by step with a KV cache (torch, or ONNX with --with-past) and stops each prompt at
    EOS or after --max-new-tokens.
    """
    from neuroada_tools.generate import sources
    from neuroada_tools.generate.decode import Sampling
    from neuroada_tools.generate.prompts import load_prompt_tokenizer, read_prompts
    from neuroada_tools.generate.run import human, run_generate

    unmerged = [model, index, delta]
    given = sum([any(v is not None for v in unmerged), merged is not None, onnx_dir is not None])
    if given != 1:
        raise click.UsageError("give one model: --model with --index and --delta, or --merged, or --onnx")
    if any(v is not None for v in unmerged) and any(v is None for v in unmerged):
        raise click.UsageError("--model, --index and --delta go together")
    if with_past and onnx_dir is None:
        raise click.UsageError("--with-past is for --onnx")
    if (prompt is None) == (prompts_file is None):
        raise click.UsageError("give --prompt TEXT or --prompts FILE")
    if top_k and temperature == 0:
        raise click.UsageError("--top-k samples: give --temperature > 0 as well")
    sampling = Sampling(temperature=temperature, top_k=top_k, seed=seed)
    texts = [prompt] if prompt is not None else read_prompts(prompts_file)

    if onnx_dir is not None:
        source = sources.open_onnx(onnx_dir, with_past=with_past, provider=provider)
    elif merged is not None:
        source = sources.open_merged(merged)
    else:
        source = sources.open_unmerged(model, index, delta)
    tok = load_prompt_tokenizer(tokenizer if tokenizer is not None else source.folder)
    with progress_bar(quiet or len(texts) <= batch_size, "generate", unit="prompt") as (set_total, advance, _):
        set_total(len(texts))
        result = run_generate(source, tok, texts, max_new_tokens, sampling=sampling, batch_size=batch_size,
                              progress=advance, template=template)
    emit(result.to_dict(), as_json, human)
