"""Task arithmetic over deltas made on the same index: ``combine([a, b], [wa, wb]) = wa*a + wb*b``.

Every delta of a NeuroAda index lives at the same positions, so a weighted sum of deltas is
again a delta of that index: no positions to align, no resolution of conflicts (TIES, DARE and the
other merge methods of PEFT's ``add_weighted_adapter`` are left out). Deltas made on different
indexes address different positions and are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from neuroada_tools.errors import SidecarError
from neuroada_tools.io.sidecar import DeltaSidecar, read_delta


def combine(deltas: Sequence[DeltaSidecar | str | Path], weights: Sequence[float]) -> DeltaSidecar:
    """``sum_i weights[i] * deltas[i]``, per tensor, as a new ``DeltaSidecar`` of the same index.

    ``deltas`` are sidecar files or ``DeltaSidecar`` objects, all made on one index (the index
    SHA-256 each records must agree: else a one-line ``SidecarError`` naming two that differ).
    Dense tensors (task heads) are combined with the same weights and must have the same names and
    shapes in every delta. The sum runs in fp64 and is rounded to fp32 once. The result records
    the index, ``task`` (when all agree) and, in ``info["combined"]``, each input's digest and
    weight; apply it with ``apply`` or write it with ``save_delta``'s writer, ``write_delta``.

    Example: deltas ``a = [[1.0, 2.0]]`` and ``b = [[3.0, -1.0]]`` with weights ``[0.5, 0.25]``
    give ``[[1.25, 0.75]]``.

    >>> import neuroada_tools, torch
    >>> from neuroada_tools.io.sidecar import read_delta
    >>> mix = neuroada_tools.combine(["a.delta.safetensors", "b.delta.safetensors"], [0.5, 0.5])
    >>> a, b = read_delta("a.delta.safetensors"), read_delta("b.delta.safetensors")
    >>> name = sorted(mix.deltas)[0]
    >>> torch.allclose(mix.deltas[name], (a.deltas[name] + b.deltas[name]) / 2)
    True
    >>> mix.index_digest == a.index_digest
    True
    """
    if len(deltas) != len(weights):
        raise ValueError(f"combine: {len(deltas)} deltas but {len(weights)} weights")
    if not deltas:
        raise ValueError("combine: no deltas given")
    loaded: list[tuple[str, DeltaSidecar]] = []
    for i, d in enumerate(deltas):
        if isinstance(d, DeltaSidecar):
            loaded.append((f"delta {i}", d))
        else:
            loaded.append((Path(d).name, read_delta(d)))
    first_label, first = loaded[0]
    for label, d in loaded[1:]:
        if d.index_digest != first.index_digest:
            raise SidecarError(
                f"combine: {first_label} was made on index {first.index_digest[:12]}... but {label} on "
                f"{d.index_digest[:12]}...; only deltas of the same index can be combined"
            )
        _same_tensors(first_label, first.deltas, label, d.deltas, "tensor")
        _same_tensors(first_label, first.dense, label, d.dense, "dense tensor")
    ws = [float(w) for w in weights]
    return DeltaSidecar(
        index_digest=first.index_digest,
        deltas={n: _weighted([d.deltas[n] for _, d in loaded], ws) for n in sorted(first.deltas)},
        dense={n: _weighted([d.dense[n] for _, d in loaded], ws) for n in sorted(first.dense)},
        task=first.task if all(d.task == first.task for _, d in loaded) else "",
        info={"combined": [{"delta": label, "sha256": d.digest, "weight": w} for (label, d), w in zip(loaded, ws)]},
    )


def _same_tensors(la: str, a: dict, lb: str, b: dict, what: str) -> None:
    for n in sorted(set(a) | set(b)):
        if n not in a or n not in b:
            has, lacks = (la, lb) if n in a else (lb, la)
            raise SidecarError(f"combine: {has} has {what} {n!r}, {lacks} does not")
        if a[n].shape != b[n].shape:
            raise SidecarError(f"combine: {what} {n!r} is {list(a[n].shape)} in {la} but {list(b[n].shape)} in {lb}")


def _weighted(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    acc = torch.zeros(tensors[0].shape, dtype=torch.float64)
    for t, w in zip(tensors, weights):
        acc += w * t.detach().to("cpu", torch.float64)
    return acc.to(torch.float32)
