"""``neuroada-tools merge``: sidecars into the base, exported as safetensors or ONNX, parity-checked."""

from __future__ import annotations

import re
from pathlib import Path

import click

from neuroada_tools.cli.common import emit, handle_errors, progress_bar

EPILOG = """\b
Examples:
  neuroada-tools merge --model ./base --index base.k20.index.safetensors \\
      --delta task.delta.safetensors --to safetensors -o ./merged
  neuroada-tools merge --model ./base --index base.k20.index.safetensors \\
      --delta task.delta.safetensors --to onnx -o ./merged-onnx
  neuroada-tools merge --model ./base --index base.k20.index.safetensors \\
      --delta task.delta.safetensors --to onnx --precision int4 -o ./merged-int4
"""


def parse_size(text: str | None) -> int | None:
    """``"5GB"`` -> 5_000_000_000, ``"500MiB"`` -> 524_288_000, ``"1000"`` -> 1000."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise click.BadParameter(f"{text!r} is not a size like 5GB or 500MiB")
    num, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    power = "KMGT".index(unit) + 1 if unit else 0
    return int(num * ((1024 if binary else 1000) ** power))


@click.command("merge", epilog=EPILOG)
@click.option(
    "--model", "model", required=True, type=click.Path(path_type=Path), help="Base model folder (or checkpoint file)."
)
@click.option("--index", "index", required=True, type=click.Path(path_type=Path), help="Index sidecar.")
@click.option("--delta", "delta", required=True, type=click.Path(path_type=Path), help="Delta sidecar.")
@click.option("--to", "to", type=click.Choice(["safetensors", "onnx"]), default="safetensors", show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option(
    "--dtype",
    type=click.Choice(["bf16", "fp16", "fp32"]),
    default=None,
    help="Merged weight dtype (default: the base's).",
)
@click.option(
    "--max-shard-size", default=None, help="Re-shard the output (e.g. 5GB); default keeps the base's sharding."
)
@click.option(
    "--onnx-dtype",
    type=click.Choice(["fp32", "keep"]),
    default="fp32",
    show_default=True,
    help="ONNX compute dtype: fp32 (bf16/fp16 weights upcast) or keep the model's.",
)
@click.option("--with-past", is_flag=True,
              help="ONNX, torch exporter, decoders: export the KV-cache graph model_with_past.onnx.")
@click.option(
    "--exporter",
    type=click.Choice(["auto", "torch", "genai"]),
    default="auto",
    show_default=True,
    help="ONNX: genai = onnxruntime-genai's model builder (one ORT GenAI folder, KV cache inside); torch = "
    "torch.onnx.export. auto: genai for decoder LLMs the builder supports, torch for the rest.",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "bf16", "int4"]),
    default="fp32",
    show_default=True,
    help="ONNX, genai exporter: weight precision (fp16/bf16: --provider cuda). Parity enforced on fp32 only.",
)
@click.option(
    "--check/--no-check", default=True, show_default=True, help="Compare logits with the unmerged model after writing."
)
@click.option(
    "--generate",
    "generate",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    metavar="N",
    help="With --check, causal LMs: also decode N greedy tokens with each form; fp32 must give the same tokens.",
)
@click.option(
    "--provider",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="ONNX Runtime provider for the check, and the execution provider a genai build targets.",
)
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@handle_errors
def command(
    model,
    index,
    delta,
    to,
    output,
    dtype,
    max_shard_size,
    onnx_dtype,
    with_past,
    exporter,
    precision,
    check,
    generate,
    provider,
    force,
    as_json,
    quiet,
) -> None:
    """Merge W + scatter(delta) into the base and write safetensors or ONNX, then check parity.

    The base is streamed one tensor at a time and never written. The output folder is an ordinary
    Hugging Face model (safetensors) or a self-contained ONNX folder (model.onnx + config +
    tokenizer); it appears only when complete.
    """
    from neuroada_tools.check.run import human as human_check

    shard = parse_size(max_shard_size)
    if to == "safetensors" and (precision != "fp32" or exporter != "auto"):
        from neuroada_tools.errors import OptionError

        raise OptionError("--exporter and --precision are for --to onnx")
    if generate:
        _check_generate_allowed(delta, check)
    summary: dict = {"to": to}
    if to == "safetensors":
        from neuroada_tools.export.merge import merge_to_folder

        with progress_bar(quiet, "merge") as (set_total, advance, _):
            s = merge_to_folder(
                model,
                index,
                delta,
                output,
                dtype=dtype,
                max_shard_size=shard,
                force=force,
                progress_total=set_total,
                progress=advance,
            )
        summary.update(s.to_dict())
        if check:
            summary["parity"] = _check(model, index, delta, output, None, with_past, provider, generate)
    else:
        from neuroada_tools.export.pipeline import merge_to_onnx

        def parity(merged_dir: Path, onnx_dir: Path) -> dict:
            return _check(model, index, delta, merged_dir, onnx_dir, with_past, provider, generate)

        with progress_bar(quiet, "merge") as (set_total, advance, bar):
            r = merge_to_onnx(
                model,
                index,
                delta,
                output,
                dtype=dtype,
                max_shard_size=shard,
                onnx_dtype=onnx_dtype,
                with_past=with_past,
                exporter=exporter,
                precision=precision,
                provider=provider,
                force=force,
                check=parity if check else None,
                progress_total=set_total,
                progress=advance,
                say=None if quiet else (lambda msg: (bar.close(), click.echo(msg, err=True))),
            )
        e = r.export
        summary.update(r.merge.to_dict())
        summary.update(
            output=str(output),
            onnx=str(e.model_path),
            onnx_with_past=str(e.with_past_path or ""),
            onnx_inputs=e.input_names,
            onnx_outputs=e.output_names,
            external_data=e.external_data,
            export_seconds=round(e.seconds, 2),
            exporter=e.exporter,
            exporter_reason=r.exporter_reason,
            precision=e.dtype if e.exporter == "genai" else onnx_dtype,
        )
        if r.checked is not None:
            summary["parity"] = r.checked
    emit(summary, as_json, lambda d: _human(d, human_check))


def _check_generate_allowed(delta: Path, check: bool) -> None:
    """Refuse ``--generate`` before anything is written where it cannot run: without ``--check``, or for
    a delta that is not a causal LM's (``--generate 8`` with a classifier's delta is one line, code 2)."""
    from neuroada_tools.errors import OptionError
    from neuroada_tools.io.sidecar import read_delta

    if not check:
        raise OptionError("--generate runs inside the parity check; leave out --no-check or --generate")
    task = read_delta(delta).task or "causal-lm"
    if task != "causal-lm":
        raise OptionError(f"{delta}: --generate needs a causal-LM delta; this one is for {task}")


def _check(model, index, delta, merged_dir, onnx_dir, with_past, provider, generate=0) -> dict:
    from neuroada_tools.check.run import run_check
    from neuroada_tools.io.checkpoint import resolve_input

    root, _ = resolve_input(model)
    r = run_check(root, index, delta, merged_dir=merged_dir, onnx_dir=onnx_dir, with_past=with_past,
                  provider=provider, generate=generate)
    return r.to_dict()


def _human(d: dict, human_check) -> str:
    lines = [f"wrote {d['output']} ({d['to']})"]
    lines.append(
        f"  merged {d['tensors_merged']} tensors, copied {d['tensors_copied']}, "
        f"dense head tensors {d['dense_tensors']}, task {d['task']}"
    )
    if d["to"] == "safetensors":
        lines.append(f"  files: {', '.join(d['files'])}")
    else:
        lines.append(f"  onnx: {d['onnx']}" + (f", {d['onnx_with_past']}" if d.get("onnx_with_past") else "")
                     + f" ({d['exporter']}: {d['exporter_reason']}; {d['export_seconds']:.1f}s)")
    if "parity" in d:
        lines.append(human_check(d["parity"]))
    return "\n".join(lines)
