"""``neuroada-tools index``: per-row top-k connections of a safetensors checkpoint -> index sidecar."""

from __future__ import annotations

import click

from neuroada_tools.cli.common import emit, handle_errors, progress_bar

EPILOG = """\b
Example:
  neuroada-tools index ./Llama-3.2-1B -k 20 -o llama.k20.index.safetensors
  neuroada-tools index model.safetensors.index.json -k 1 --target q_proj --target v_proj -o qv.index.safetensors
"""


@click.command("index", epilog=EPILOG)
@click.argument("model", type=click.Path(path_type=str))
@click.option("-k", "k", type=int, default=20, show_default=True, help="Trainable input connections per output neuron.")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=str),
    help="Index sidecar to write (*.index.safetensors).",
)
@click.option(
    "--criterion",
    type=click.Choice(["magnitude", "random", "smallest"]),
    default="magnitude",
    show_default=True,
    help="magnitude: top-k of |W| per row (the method); random: seeded; smallest: bottom-k (ablation).",
)
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Seed for --criterion random (default 0).")
@click.option(
    "--target",
    "targets",
    multiple=True,
    metavar="PATTERN",
    help="Adapt these modules instead of the defaults (PEFT target_modules: regex full match or dotted suffix). "
        "Repeatable.",
)
@click.option("--exclude", "excludes", multiple=True, metavar="PATTERN", help="Leave these modules out. Repeatable.")
@click.option(
    "--clip-k", is_flag=True, help="Use min(k, d_in) for tensors with fewer than k inputs instead of failing."
)
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@handle_errors
def command(model, k, output, criterion, seed, targets, excludes, clip_k, force, as_json, quiet) -> None:
    """Select the top-k input connections of every output neuron of a safetensors checkpoint.

    MODEL is a .safetensors file, a sharded model.safetensors.index.json, or a model folder.
    Reads one tensor at a time and writes an index sidecar (formats/index-v1.md).
    """
    from neuroada_tools.index.build import run_index

    if seed is not None and criterion != "random":
        raise click.UsageError("--seed only applies to --criterion random")
    with progress_bar(quiet, "index") as (set_total, advance, _):
        summary = run_index(
            model,
            k,
            output,
            force=force,
            criterion=criterion,
            seed=seed,
            include=targets,
            exclude=excludes,
            clip_k=clip_k,
            progress_total=set_total,
            progress=advance,
        )
    emit(summary.to_dict(), as_json, _human_index)


def _human_index(s: dict) -> str:
    lines = [
        f"wrote {s['output']}",
        f"  tensors adapted:      {s['tensors_adapted']}",
        f"  trainable parameters: {s['trainable_parameters']:,} of {s['model_parameters']:,} "
        f"({100 * s['trainable_share']:.4f}%)",
        f"  k={s['k']}, criterion={s['criterion']}, sha256={s['sha256'][:16]}...",
    ]
    if s["clipped"]:
        lines.append(f"  k clipped to d_in for {len(s['clipped'])} tensors")
    speed = f" ({s['bytes_indexed'] / s['seconds'] / 1e9:.2f} GB/s of adapted weights)" if s["seconds"] >= 0.5 else ""
    lines.append(f"  {s['seconds']:.1f} s{speed}")
    if s["selection_kernel"] != "native":
        lines.append("  note: no C compiler found, so the slower torch selection ran (same result; set CC, see README)")
    return "\n".join(lines)
