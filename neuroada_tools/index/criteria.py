"""Pure math of NeuroAda's selection: which k input connections each output neuron trains.

``select(weight, k, criterion)`` returns an int32 ``[d_out, k]`` tensor, each row strictly
ascending. The weight is given in its logical ``(out, in)`` orientation (a transposed view of a
GPT-2 ``Conv1D`` weight is fine). Nothing here reads files or knows tensor names.

Fast path: the bits of an IEEE float without its sign bit order exactly like its magnitude, so
``|W|`` ranks are computed on the raw integer patterns (bf16/fp16: 15 bits, fp32: 31 bits) without
a float conversion. Ties are broken towards the lower column by packing the column into the low
bits of the key: ``key = (magnitude_bits << s) | (2**s - 1 - col)`` makes every key unique and,
among equal magnitudes, the lower column the larger key.

Worked example (k=2, one row): ``W = [[0.5, -2.0, 2.0, 1.0]]``. ``|W| = [0.5, 2, 2, 1]``; the two
largest are the tied 2.0 at columns 1 and 2, so the result is ``[[1, 2]]``. With k=1 the tie goes to
the lower column: ``[[1]]``. ``criterion="smallest"`` with k=1 gives ``[[0]]``.

Fastest path: ``kernels/native.py`` compiles a small C kernel (``kernels/csrc/select.c``: one filtering pass
per row against a threshold learned from the previous row, then a radix select on the few kept
keys) that returns the same indices; rows are split over ``torch.get_num_threads()`` threads.
Where no C compiler is available a torch path runs instead. Both live in ``kernels/topk.py``,
behind the torch op ``neuroada::select_rows``.

Gradient-based selection needs data and a backward pass: ``index/gradient.py`` computes its
scores and then ranks them with the same per-row top-k (``select(scores, k, "magnitude")``: the
scores are non-negative fp32, so their magnitude order is their order).
"""

from __future__ import annotations

import hashlib

import torch

from neuroada_tools.kernels import ops as kernel_ops  # noqa: F401  (registers torch.ops.neuroada.*)
from neuroada_tools.kernels.topk import magnitude_bits  # noqa: F401  (re-exported)

#: Criteria computed from the weights alone (``select`` takes these).
WEIGHT_CRITERIA = ("magnitude", "smallest", "random")
#: Every criterion an index sidecar may record; ``gradient`` needs calibration data (``index/gradient.py``).
CRITERIA = (*WEIGHT_CRITERIA, "gradient")
_ROW_CHUNK = 256  # rows per step of the random draw

def select(
    weight: torch.Tensor, k: int, criterion: str = "magnitude", *, seed: int | None = None, salt: str = ""
) -> torch.Tensor:
    """Per-row selection of ``k`` columns of a 2-D weight ``[d_out, d_in]``; int32, rows ascending.

    ``magnitude``: the k largest ``|W[i, j]|``; ``smallest``: the k smallest; both with ties to
    the lower column. ``random``: k columns drawn uniformly per row from a generator seeded by
    ``seed`` and ``salt`` (the tensor name), so each tensor's draw does not depend on the others.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    d_out, d_in = weight.shape
    if not 1 <= k <= d_in:
        raise ValueError(f"k={k} outside 1..{d_in}")
    if criterion == "random":
        return _select_random(d_out, d_in, k, seed if seed is not None else 0, salt)
    if criterion not in ("magnitude", "smallest"):
        raise ValueError(f"unknown criterion {criterion!r}")
    return torch.ops.neuroada.select_rows(weight, k, criterion == "magnitude")


def _select_random(d_out: int, d_in: int, k: int, seed: int, salt: str) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}\0{salt}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    out = torch.empty((d_out, k), dtype=torch.int32)
    for s in range(0, d_out, _ROW_CHUNK):
        n = min(_ROW_CHUNK, d_out - s)
        scores = torch.rand((n, d_in), generator=gen)
        out[s : s + n] = scores.topk(k, dim=1, sorted=False).indices.sort(dim=1).values
    return out


def reference_select(weight: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Slow, obviously-correct reference: stable sort of fp32 |W| per row (for tests)."""
    mag = weight.to(torch.float32).abs()
    order = torch.sort(mag if not largest else -mag, dim=1, stable=True).indices
    return order[:, :k].sort(dim=1).values.to(torch.int32)
