"""``neuroada-tools index``: per-row top-k connections of a safetensors checkpoint -> index sidecar."""

from __future__ import annotations

from pathlib import Path

import click

from neuroada_tools.cli.common import emit, handle_errors, progress_bar
from neuroada_tools.hf import TASKS
from neuroada_tools.train.config import TrainConfig
from neuroada_tools.train.data.prompts import TEMPLATES

_TRAIN = TrainConfig.__dataclass_fields__  # --batch-size defaults as in train-sparse

EPILOG = """\b
Example:
  neuroada-tools index ./Llama-3.2-1B -k 20 -o llama.k20.index.safetensors
  neuroada-tools index model.safetensors.index.json -k 1 --target q_proj --target v_proj -o qv.index.safetensors
  neuroada-tools index ./Llama-3.2-1B -k 20 --criterion gradient --data arc/train.json -o llama.grad.index.safetensors
"""

#: the options that only --criterion gradient takes (flag -> parameter name)
CALIBRATION_OPTIONS = {
    "--data": "data", "--calibration-examples": "calibration_examples", "--batch-size": "batch_size",
    "--max-length": "max_length", "--task": "task", "--device": "device", "--trust-remote-code": "trust_remote_code",
    "--template": "template",
}


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
    type=click.Choice(["magnitude", "random", "smallest", "gradient"]),
    default="magnitude",
    show_default=True,
    help="magnitude: top-k of |W| per row (the method); random: seeded; smallest: bottom-k (ablation); "
        "gradient: top-k of sum_b |dL_b/dW| over calibration batches of --data (loads the model).",
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
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="--criterion gradient: calibration data, in any format train-sparse reads.")
@click.option("--calibration-examples", type=click.IntRange(min=1), default=None, metavar="N",
              help="--criterion gradient: score on the first N examples of --data, in file order (default 256).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="--criterion gradient: examples per calibration batch, as train-sparse "
                   f"(default {_TRAIN['batch_size'].default}).")
@click.option("--max-length", type=click.IntRange(min=1), default=None,
              help="--criterion gradient: cut longer examples to this many tokens, as train-sparse "
                   "(default: 256, or the model's maximum positions if fewer).")
@click.option("--task", type=click.Choice(list(TASKS)), default=None,
              help="--criterion gradient: the loss to score with (default: from the config, as train-sparse).")
@click.option("--template", type=click.Choice(list(TEMPLATES)), default=None,
              help="--criterion gradient: how instruction records become a prompt, as train-sparse "
                   "(default alpaca; chat: the tokenizer's chat template).")
@click.option("--device", default=None,
              help="--criterion gradient: auto (cuda if available; the default), cpu, cuda or cuda:N.")
@click.option("--trust-remote-code", is_flag=True,
              help="--criterion gradient: allow the model folder's own Python code (off by default).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@handle_errors
def command(model, k, output, criterion, seed, targets, excludes, clip_k, force, as_json, quiet, **calibration) -> None:
    """Select the top-k input connections of every output neuron of a safetensors checkpoint.

    MODEL is a .safetensors file, a sharded model.safetensors.index.json, or a model folder.
    Reads one tensor at a time and writes an index sidecar (formats/index-v1.md). With
    --criterion gradient, MODEL must be the model folder: it is loaded with transformers and
    scored on --data first.
    """
    from neuroada_tools.errors import OptionError

    if seed is not None and criterion != "random":
        raise click.UsageError("--seed only applies to --criterion random")
    given = [flag for flag, name in CALIBRATION_OPTIONS.items() if calibration[name] not in (None, False)]
    if criterion != "gradient" and given:
        raise OptionError(f"{given[0]} only applies to --criterion gradient (the {criterion} criterion uses no data)")
    common = dict(force=force, include=targets, exclude=excludes, clip_k=clip_k)
    if criterion == "gradient":
        _gradient(model, k, output, quiet, as_json, calibration, common)
        return
    from neuroada_tools.index.build import run_index

    with progress_bar(quiet, "index") as (set_total, advance, _):
        summary = run_index(
            model, k, output, criterion=criterion, seed=seed, progress_total=set_total, progress=advance, **common
        )
    emit(summary.to_dict(), as_json, _human_index)


def _gradient(model, k, output, quiet: bool, as_json: bool, options: dict, common: dict) -> None:
    from neuroada_tools.errors import OptionError
    from neuroada_tools.index.gradient import Calibration, run_gradient_index

    if options["data"] is None:
        raise OptionError("--criterion gradient needs --data FILE (the calibration examples)")
    trust_remote_code = bool(options["trust_remote_code"])  # the user's flag, off by default
    calibration = Calibration(
        data=options["data"],
        task=options["task"],
        trust_remote_code=trust_remote_code,
        **{name: options[opt] for name, opt in (("examples", "calibration_examples"), ("batch_size", "batch_size"),
                                                ("max_length", "max_length"), ("device", "device"),
                                                ("template", "template"))
           if options[opt] is not None},
    )
    with progress_bar(quiet, "calibration", unit="ex") as (set_total, advance, _):
        summary = run_gradient_index(
            model, k, output, calibration, progress_total=set_total, progress=advance, **common
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
    c = s.get("calibration")
    if c:
        lines.append(
            f"  calibration: {c['examples']} examples ({c['task']}, batch {c['batch_size']}, max length "
            f"{c['max_length']}) of data sha256={c['data_sha256'][:16]}..., mean loss {c['mean_loss']:.4f} "
            f"on {c['device']}"
        )
    if s["clipped"]:
        lines.append(f"  k clipped to d_in for {len(s['clipped'])} tensors")
    speed = f" ({s['bytes_indexed'] / s['seconds'] / 1e9:.2f} GB/s of adapted weights)" if s["seconds"] >= 0.5 else ""
    if c:
        speed = ""  # the time is the calibration's, not reading
    lines.append(f"  {s['seconds']:.1f} s{speed}")
    if s["selection_kernel"] != "native":
        lines.append("  note: no C compiler found, so the slower torch selection ran "
                     "(same result; set CC, see docs/kernels.md)")
    return "\n".join(lines)
