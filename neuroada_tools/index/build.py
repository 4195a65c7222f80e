"""``index``: stream a checkpoint one tensor at a time and build the index sidecar.

For each target weight: read its bytes (one copy, no mmap of the shard), view it in logical
``(out, in)`` orientation (a transposed view for Conv1D, no copy), select k columns per row
(``select.py``), fingerprint it (``sidecar.fingerprint``), drop it. Peak memory is the largest
target tensor (one reused read buffer) plus that tensor's indices: ``run_index`` streams each
tensor's indices into the output file as soon as they are made (``IndexStreamWriter``), so the
whole index (108 MB for LLaMA-7B at k=20) is never held.

The ``gradient`` criterion scores the weights on calibration data first (``index/gradient.py``)
and hands the scores to ``_build``, which ranks them with the same per-row top-k and writes the
same fingerprints of the base weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from neuroada_tools.errors import TargetError, TrainingError
from neuroada_tools.index.criteria import WEIGHT_CRITERIA, select
from neuroada_tools.index.targets import Target, resolve_targets
from neuroada_tools.io.checkpoint import Checkpoint, open_checkpoint
from neuroada_tools.io.outputs import atomic_file, check_output
from neuroada_tools.io.sidecar import IndexSidecar, IndexStreamWriter, TensorEntry, fingerprint
from neuroada_tools.kernels import native

Progress = Callable[[int], None]  # called with the number of bytes just processed


@dataclass
class IndexSummary:
    """What ``index`` did, for the human summary and ``--json``."""

    output: str
    sha256: str
    k: int
    criterion: str
    tensors_adapted: int
    trainable_parameters: int
    model_parameters: int
    trainable_share: float
    bytes_indexed: int
    clipped: list[str]
    seconds: float = 0.0
    selection_kernel: str = "native"  # "native" (compiled C) or "torch" (no C compiler: slower)
    #: criterion ``gradient``: the sidecar's ``neuroada.calibration`` plus the calibration's
    #: ``target_count`` (tokens or examples the loss summed over) and ``mean_loss``; else None
    calibration: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def plan(
    ckpt: Checkpoint, k: int, *, include=(), exclude=(), clip_k: bool = False
) -> tuple[list[Target], dict[str, int], list[str]]:
    """Resolve targets and the per-tensor k; raise ``TargetError`` when k doesn't fit."""
    if k < 1:
        raise TargetError(f"-k must be >= 1, got {k}")
    targets = resolve_targets(ckpt, include, exclude)
    ks: dict[str, int] = {}
    clipped: list[str] = []
    for t in targets:
        if k > t.d_in:
            if not clip_k:
                raise TargetError(
                    f"{t.name!r}: k={k} exceeds its {t.d_in} input connections (d_in); "
                    "lower -k or pass --clip-k"
                )
            clipped.append(t.name)
        ks[t.name] = min(k, t.d_in)
    return targets, ks, clipped


def build_index(
    model: Path | str,
    k: int,
    *,
    criterion: str = "magnitude",
    seed: int | None = None,
    include: tuple[str, ...] | list[str] = (),
    exclude: tuple[str, ...] | list[str] = (),
    clip_k: bool = False,
) -> IndexSidecar:
    """Build the index for ``model`` in memory (indices are small: d_out * k int32 per tensor)."""
    ckpt = open_checkpoint(model)
    targets, ks, _ = plan(ckpt, k, include=include, exclude=exclude, clip_k=clip_k)
    return _build(ckpt, targets, ks, k, criterion, seed)


def _build(
    ckpt: Checkpoint,
    targets: list[Target],
    ks: dict[str, int],
    k: int,
    criterion: str,
    seed: int | None,
    progress: Progress | None = None,
    output: Path | None = None,
    *,
    scores: dict[str, torch.Tensor] | None = None,
    calibration: dict | None = None,
) -> IndexSidecar:
    """Select and fingerprint every target, one tensor at a time.

    With ``output`` the indices are streamed into that file as they are made (``IndexStreamWriter``)
    and the returned sidecar's ``indices`` stay empty; without it they are kept in memory.
    With ``scores`` (criterion ``gradient``: non-negative fp32, stored orientation, one per target)
    each row's top-k is taken on the score instead of the weight, ties to the lower column; each
    score is dropped from the dict once used. The fingerprints are those of the base weights always.
    """
    if scores is None and criterion == "gradient":
        raise TargetError("criterion 'gradient' needs calibration data (index/gradient.py: run_gradient_index)")
    if scores is None and criterion not in WEIGHT_CRITERIA:
        raise TargetError(f"unknown criterion {criterion!r} (choose {', '.join(WEIGHT_CRITERIA)})")
    if criterion == "random" and seed is None:
        seed = 0
    index = IndexSidecar(
        k=k,
        criterion=criterion,
        indices={},
        entries={t.name: TensorEntry((t.d_out, t.d_in), t.layout, ckpt.tensors[t.name].dtype, "") for t in targets},
        seed=seed if criterion == "random" else None,
        model_type=str((ckpt.config or {}).get("model_type", "")),
        calibration=calibration,
    )
    writer = IndexStreamWriter(output, index, ks) if output is not None else None
    try:
        buffer = ckpt.buffer_for([t.name for t in targets])
        for t in sorted(targets, key=lambda t: t.name):
            stored = ckpt.read(t.name, buffer)
            logical = stored.t() if t.transposed else stored
            if scores is not None:
                idx = _select_scores(t, scores.pop(t.name), ks[t.name])
            else:
                idx = select(logical, ks[t.name], criterion, seed=seed, salt=t.name)
            fp = fingerprint(logical, idx)
            if writer is not None:
                writer.write(t.name, idx, fp)
            else:
                index.indices[t.name] = idx
                index.entries[t.name] = replace(index.entries[t.name], fingerprint=fp)
            del stored, logical, idx
            if progress:
                progress(ckpt.tensors[t.name].raw.nbytes)
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return index


def _select_scores(t: Target, score: torch.Tensor, k: int) -> torch.Tensor:
    """Per-row top-k of a non-negative fp32 score in stored orientation (ties to the lower column)."""
    if not bool(torch.isfinite(score).all()):
        raise TrainingError(f"{t.name!r}: the gradient score is NaN or infinite; check the data and the model")
    return select(score.t() if t.transposed else score, k, "magnitude")


def run_index(
    model: Path | str,
    k: int,
    output: Path | str,
    *,
    force: bool = False,
    criterion: str = "magnitude",
    seed: int | None = None,
    include=(),
    exclude=(),
    clip_k: bool = False,
    progress_total=None,
    progress: Progress | None = None,
) -> IndexSummary:
    """Build the index and write it atomically to ``output``."""
    started = time.perf_counter()
    output = Path(output)
    ckpt = open_checkpoint(model)
    check_output(output, force, inputs=list(ckpt.files) + [ckpt.root / "config.json"])
    targets, ks, clipped = plan(ckpt, k, include=include, exclude=exclude, clip_k=clip_k)
    if progress_total:
        progress_total(sum(ckpt.tensors[t.name].raw.nbytes for t in targets))
    with atomic_file(output) as tmp:
        index = _build(ckpt, targets, ks, k, criterion, seed, progress, output=tmp)
    return summarize(output, index, ckpt, targets, ks, clipped, started)


def summarize(output: Path | str, index, ckpt: Checkpoint, targets, ks: dict[str, int], clipped: list,
              started: float, **extra) -> IndexSummary:
    """The ``IndexSummary`` of an index just written (every criterion's ``run_*`` ends with it)."""
    trainable = sum(t.d_out * ks[t.name] for t in targets)
    total = ckpt.total_parameters
    return IndexSummary(
        output=str(output), sha256=index.digest, k=index.k, criterion=index.criterion,
        tensors_adapted=len(targets), trainable_parameters=trainable, model_parameters=total,
        trainable_share=trainable / total if total else 0.0,
        bytes_indexed=sum(ckpt.tensors[t.name].raw.nbytes for t in targets), clipped=clipped,
        seconds=round(time.perf_counter() - started, 3),
        selection_kernel="native" if native.kernel() is not None else "torch", **extra,
    )
