"""Merge, then export to ONNX, staged and swapped into place: what ``merge --to onnx`` and the demo run.

1. The merged safetensors folder is written beside the output as ``.OUT.merged-PID``
   (``merge_to_folder``: streamed, fingerprints verified).
2. The ONNX folder is exported from it into ``.OUT.onnx-PID``: by onnxruntime-genai's model builder
   for the decoder LLMs it supports (``genai_build.py``: one ORT GenAI folder, KV cache inside), by
   ``torch.onnx.export`` otherwise (``onnx_export.py``); :func:`choose_exporter` says which.
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

from neuroada_tools.errors import OptionError, OutputError
from neuroada_tools.export import genai_build
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
    exporter_reason: str = ""


EXPORTERS = ("auto", "torch", "genai")


def choose_exporter(exporter: str, task: str, merged_dir: Path, *, with_past: bool = False,
                    precision: str = "fp32", onnx_dtype: str = "fp32") -> tuple[str, str]:
    """``("genai" | "torch", why)`` for ``merge --to onnx --exporter EXPORTER``.

    ``auto``: the builder for a causal LM whose architecture it lists, torch otherwise (encoders,
    classifiers, GPT-2, ...) and for ``--with-past`` (torch's two-graph layout). A precision below
    fp32 needs the builder. ``genai`` forced on what it cannot build is an error, never a fallback.
    """
    if exporter not in EXPORTERS:
        raise OptionError(f"exporter {exporter!r}: expected one of {', '.join(EXPORTERS)}")
    if exporter == "torch":
        if precision != "fp32":
            raise OptionError(f"--precision {precision} is built by --exporter genai; torch uses --onnx-dtype")
        return "torch", "asked for (--exporter torch)"
    if exporter == "genai" or precision != "fp32":
        if with_past:
            raise OptionError("--with-past is torch's layout (model_with_past.onnx); the genai build holds the "
                              "KV cache in its one model.onnx: leave out --with-past, or use --exporter torch")
        if onnx_dtype != "fp32":
            raise OptionError("--onnx-dtype is for --exporter torch; the genai build takes --precision")
        if task != "causal-lm":
            raise OptionError(f"onnxruntime-genai's model builder builds decoder LLMs; this is a {task} model: "
                              "use --exporter torch")
        genai_build.require_builder()
        return "genai", "asked for" if exporter == "genai" else f"--precision {precision}"
    arch = genai_build.architecture_of(merged_dir)
    if task != "causal-lm":
        return "torch", f"a {task} model"
    if with_past:
        return "torch", "--with-past (torch's model_with_past.onnx)"
    if onnx_dtype != "fp32":
        return "torch", "--onnx-dtype keep"
    if not genai_build.builder_available():
        return "torch", f"onnxruntime-genai not installed ({genai_build.INSTALL_HINT})"
    why = genai_build.unsupported_reason(merged_dir, required=True)
    if why is not None:
        return "torch", why
    return "genai", f"{arch}: a decoder LLM the model builder supports"


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
    exporter: str = "auto",
    precision: str = "fp32",
    provider: str = "cpu",
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
    without ``force``, outputs inside the base, an exporter or precision that cannot run) come
    before anything is written. ``exporter``/``precision``/``provider``: :func:`choose_exporter`;
    the genai build targets ``provider``'s execution provider.
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
    if exporter not in EXPORTERS:
        raise OptionError(f"exporter {exporter!r}: expected one of {', '.join(EXPORTERS)}")
    if exporter == "genai" or precision != "fp32":  # refuse what cannot be built before the merge
        genai_build.require_builder()
        genai_build.check_precision(precision, provider)
        genai_build.check_architecture(root)
    remove_stale_temporaries(output)
    staging = temp_name(output, "merged")
    with staged_dir(output, "merged", keep=True):  # owns the staging name; deleted at the end
        summary = merge_to_folder(model, index, delta, staging, dtype=dtype, max_shard_size=max_shard_size,
                                  force=True, progress_total=progress_total, progress=progress)
        chosen, why = choose_exporter(exporter, summary.task, staging, with_past=with_past, precision=precision,
                                      onnx_dtype=onnx_dtype)
        if chosen == "genai":
            say(f"building an ORT GenAI folder (onnxruntime-genai model builder, {precision}, {provider}; {why})...")
        else:
            say(f"exporting ONNX (torch.onnx.export, dynamo, opset 18; {why})...")
        if output.exists() and not force:  # appeared while we merged
            raise OutputError(f"{output}: already exists (use --force to overwrite)")
        fresh = temp_name(output, "onnx")
        with staged_dir(output, "onnx", keep=True):
            if chosen == "genai":
                result = genai_build.build_genai(staging, fresh, precision=precision, provider=provider)
            else:
                result = export_onnx(staging, fresh, task=summary.task, with_past=with_past, dtype=onnx_dtype)
            replace_dir(fresh, output)
        _point_into(result, output)
        merged_dir = staging
        if merged_output is not None:
            replace_dir(staging, merged_output)
            merged_dir = merged_output
            summary.output = str(merged_output)
        checked = check(merged_dir, output) if check is not None else None
    return OnnxMergeResult(merge=summary, export=result, merged_dir=merged_output, checked=checked,
                           exporter_reason=why)


def _point_into(result: ExportResult, output: Path) -> None:
    """Rewrite the export's paths from the staging folder to the final one."""
    result.out_dir = output
    result.model_path = output / result.model_path.name
    if result.with_past_path is not None:
        result.with_past_path = output / result.with_past_path.name
