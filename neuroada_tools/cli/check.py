"""``neuroada-tools check``: the standalone parity check of a merged folder and/or an ONNX folder."""

from __future__ import annotations

from pathlib import Path

import click

from neuroada_tools.cli.common import emit, handle_errors

EPILOG = """\b
Example:
  neuroada-tools check --model ./base --index base.k20.index.safetensors \\
      --delta task.delta.safetensors --merged ./merged --onnx ./merged-onnx
"""


@click.command("check", epilog=EPILOG)
@click.option("--model", required=True, type=click.Path(path_type=Path), help="Base model folder.")
@click.option("--index", required=True, type=click.Path(path_type=Path), help="Index sidecar.")
@click.option("--delta", required=True, type=click.Path(path_type=Path), help="Delta sidecar.")
@click.option("--merged", type=click.Path(path_type=Path), default=None, help="Merged safetensors folder.")
@click.option("--onnx", "onnx_dir", type=click.Path(path_type=Path), default=None,
              help="ONNX folder: model.onnx (torch export), or an ORT GenAI folder run on its runtime.")
@click.option("--with-past", is_flag=True, help="Also check model_with_past.onnx (prefill + one cached step).")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--batch", type=click.IntRange(min=2), default=3, show_default=True)
@click.option("--seq", type=click.IntRange(min=2), default=11, show_default=True)
@click.option("--seed", type=int, default=1234, show_default=True)
@click.option("--generate", "generate", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
              help="Also decode N greedy tokens per prompt with each form; fp32 must give the same tokens.")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def command(model, index, delta, merged, onnx_dir, with_past, provider, batch, seq, seed, generate, as_json) -> None:
    """Compare logits of the unmerged model (base + bypass) with a merged and/or ONNX export.

    Exit code 0 when every comparison is within tolerance, 1 when one is not. With --generate N,
    greedy tokens that differ are exit code 1 too, with one line on stderr naming the first difference.
    """
    from neuroada_tools.check.run import human, run_check

    if merged is None and onnx_dir is None:
        raise click.UsageError("give --merged and/or --onnx")
    r = run_check(model, index, delta, merged_dir=merged, onnx_dir=onnx_dir, with_past=with_past,
                  provider=provider, batch=batch, seq=seq, seed=seed, generate=generate, raise_on_failure=False)
    emit(r.to_dict(), as_json, human)
    if not r.generation_passed:
        click.echo(f"error: {r.generation['mismatch']}", err=True)
    if not r.passed:
        raise SystemExit(1)
