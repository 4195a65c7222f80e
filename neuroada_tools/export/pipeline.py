"""Merge, then export to ONNX, staged and swapped into place: what ``merge --to onnx`` and the demo run.

1. The merged safetensors folder is written beside the output as ``.OUT.merged-PID``
   (``merge_to_folder``: streamed, fingerprints verified).
2. The ONNX folder is exported from it into ``.OUT.onnx-PID``.
3. Only then is ``.OUT.onnx-PID`` swapped in for ``OUT`` (an existing ``OUT``, with ``force``, stays
   whole until that moment), and the staged merge is either deleted or, with ``merged_output``,
   swapped into place as a second result.
4. ``check`` (if given) runs while both folders exist, with their final paths, e.g. the parity
   check of ``check/run.py``; what it returns is kept in the result.

A failure or kill at any step leaves no ``OUT`` (or the old one) and temporaries that the next run
deletes (``io/outputs.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuroada_tools.errors import OutputError
from neuroada_tools.export.merge import MergeSummary, merge_to_folder
from neuroada_tools.export.onnx_export import ExportResult, export_onnx
from neuroada_tools.io.checkpoint import resolve_input
from neuroada_tools.io.outputs import check_output_dir, remove_stale_temporaries, replace_dir, staged_dir, temp_name


@dataclass
class OnnxMergeResult:
    """What :func:`merge_to_onnx` wrote: the merge summary, the export result (paths inside the
    final output folder), and what ``check`` returned (None without a check)."""

    merge: MergeSummary
    export: ExportResult
    merged_dir: Path | None
    checked: Any = None


def merge_to_onnx(
    model: Path,
    index: Path,
    delta: Path,
    output: Path,
    *,
    dtype: str | None = None,
    max_shard_size: int | None = None,
    onnx_dtype: str = "fp32",
    with_past: bool = False,
    force: bool = False,
    merged_output: Path | None = None,
    check: Callable[[Path, Path], Any] | None = None,
    progress_total: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
    say: Callable[[str], None] | None = None,
) -> OnnxMergeResult:
    """Merge ``delta`` (trained on ``index``) into ``model`` and export the result to ONNX at
    ``output``; keep the merged safetensors folder at ``merged_output`` if given.

    ``check(merged_dir, onnx_dir)`` runs once both are in place. Refusals (existing outputs
    without ``force``, outputs inside the base) come before anything is written.
    """
    say = say or (lambda _msg: None)
    output = Path(output)
    root, _ = resolve_input(Path(model))
    check_output_dir(root, output, force)
    if merged_output is not None:
        merged_output = Path(merged_output)
        check_output_dir(root, merged_output, force)
        if merged_output.resolve() == output.resolve():
            raise OutputError(f"{merged_output}: the merged folder and the ONNX folder must differ")
    remove_stale_temporaries(output)
    staging = temp_name(output, "merged")
    with staged_dir(output, "merged", keep=True):  # owns the staging name; deleted at the end
        summary = merge_to_folder(model, index, delta, staging, dtype=dtype, max_shard_size=max_shard_size,
                                  force=True, progress_total=progress_total, progress=progress)
        say("exporting ONNX (torch.onnx.export, dynamo, opset 18)...")
        if output.exists() and not force:  # appeared while we merged
            raise OutputError(f"{output}: already exists (use --force to overwrite)")
        fresh = temp_name(output, "onnx")
        with staged_dir(output, "onnx", keep=True):
            result = export_onnx(staging, fresh, task=summary.task, with_past=with_past, dtype=onnx_dtype)
            replace_dir(fresh, output)
        _point_into(result, output)
        merged_dir = staging
        if merged_output is not None:
            replace_dir(staging, merged_output)
            merged_dir = merged_output
            summary.output = str(merged_output)
        checked = check(merged_dir, output) if check is not None else None
    return OnnxMergeResult(merge=summary, export=result, merged_dir=merged_output, checked=checked)


def _point_into(result: ExportResult, output: Path) -> None:
    """Rewrite the export's paths from the staging folder to the final one."""
    result.out_dir = output
    result.model_path = output / result.model_path.name
    if result.with_past_path is not None:
        result.with_past_path = output / result.with_past_path.name
