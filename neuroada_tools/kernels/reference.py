"""The three sparse products of the NeuroAda bypass, in plain torch: the contract every backend matches.

A bypass adds, to a weight ``W`` of shape ``[d_out, d_in]``, a sparse matrix ``S`` that holds
``vals[i, j]`` (the trainable ``delta``, fp32) at column ``idx[i, j]`` of row ``i``. The index layout
is the one the index sidecar stores: exactly ``k`` distinct columns per row, ascending, so ``idx``
and ``vals`` are both ``[d_out, k]``. The three products are

- ``sparse_mm(x, idx, vals)``        ``y  = x S^T``   (the bypass forward, ``[T, d_out]``)
- ``sparse_mm_t(g, idx, vals, d_in)`` ``gx = g S``     (its share of ``grad_x``, ``[T, d_in]``)
- ``sddmm(g, x, idx)``               ``out[i, j] = (g^T x)[i, idx[i, j]]`` (``grad_delta``, ``[d_out, k]``)

None of them builds ``S`` or any ``[d_out, d_in]`` tensor. The compiled C kernels (CPU), the Triton
kernels (``triton_kernels.py``; CUDA, or CPU under ``TRITON_INTERPRET=1``) and the sharding-safe
bypass path (``sparse_add.py``, FSDP2) are all tested against these functions.

Conventions shared by all three:

- Token inputs (``x`` ``[T, d_in]``, ``g`` ``[T, d_out]``) are 2-D: a caller with batch dims
  flattens them first (``x.reshape(-1, d_in)``). They may be non-contiguous (strided views).
- ``idx`` is an integer tensor (int32 or int64) ``[d_out, k]``; ``vals`` is ``[d_out, k]``.
- Sums are accumulated in fp32 whatever the input dtypes (bf16, fp16, fp32), or in float64 when an
  input is float64 (so ``torch.autograd.gradcheck`` can run on them).
- ``sddmm`` returns fp32 (float64 for float64 inputs); ``sparse_mm`` returns ``x``'s dtype and
  ``sparse_mm_t`` ``g``'s dtype, rounded once from the fp32 sum.

What this file leaves out: speed. Each function loops over the ``k`` selected columns with one
``[T, d_out]`` temporary per step; that is fine for tests and CPU fallbacks, not for training.
"""

from __future__ import annotations

import torch

__all__ = ["accumulation_dtype", "check_pattern", "sddmm", "sparse_mm", "sparse_mm_t"]


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the sums run in: float64 if any of ``tensors`` is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_pattern(idx: torch.Tensor, vals: torch.Tensor | None = None) -> tuple[int, int]:
    """Check ``idx`` (and ``vals``) have the bypass layout; return ``(d_out, k)``.

    Only shapes and dtypes are checked (cheap, no device sync); that the columns are distinct,
    ascending and in range is the index sidecar's rule, checked when the sidecar is read.
    """
    if idx.dim() != 2:
        raise ValueError(f"idx must be 2-D [d_out, k], found shape {tuple(idx.shape)}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"idx must be int32 or int64, found {idx.dtype}")
    if vals is not None and tuple(vals.shape) != tuple(idx.shape):
        raise ValueError(f"vals shape {tuple(vals.shape)} does not match idx shape {tuple(idx.shape)}")
    return int(idx.shape[0]), int(idx.shape[1])


def _check_tokens(name: str, t: torch.Tensor, width: int, what: str) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [T, {what}] (flatten batch dims first), found shape {tuple(t.shape)}")
    if t.shape[1] != width:
        raise ValueError(f"{name} has {t.shape[1]} columns, expected {what} = {width}")


def sddmm(g: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Sampled dense-dense matmul: ``out[i, j] = sum_t g[t, i] * x[t, idx[i, j]]``.

    The gradient of the bypass with respect to ``delta``: the entries of the dense weight gradient
    ``g^T x`` at the selected positions, without forming ``g^T x``.

    Args:
        g: ``[T, d_out]`` output gradient (bf16, fp16, fp32 or float64).
        x: ``[T, d_in]`` layer input, same T.
        idx: ``[d_out, k]`` selected columns.

    Returns:
        ``[d_out, k]`` fp32 (float64 for float64 inputs).

    Example (T = 2, d_out = 2, d_in = 3, k = 2)::

        >>> g = torch.tensor([[1., 2.], [3., 4.]])
        >>> x = torch.tensor([[1., 10., 100.], [2., 20., 200.]])
        >>> idx = torch.tensor([[0, 2], [1, 2]])
        >>> sddmm(g, x, idx)
        tensor([[   7.,  700.],
                [ 100., 1000.]])

    Row 0 picks columns 0 and 2: ``1*1 + 3*2 = 7`` and ``1*100 + 3*200 = 700``; row 1 picks
    columns 1 and 2: ``2*10 + 4*20 = 100`` and ``2*100 + 4*200 = 1000``.
    """
    d_out, k = check_pattern(idx)
    _check_tokens("g", g, d_out, "d_out")
    if x.dim() != 2 or x.shape[0] != g.shape[0]:
        raise ValueError(f"x must be 2-D [T, d_in] with T = {g.shape[0]}, found shape {tuple(x.shape)}")
    acc = accumulation_dtype(g, x)
    gf, xf, cols = g.to(acc), x.to(acc), idx.long()
    out = torch.empty((d_out, k), dtype=acc, device=g.device)
    for j in range(k):
        out[:, j] = (gf * xf.index_select(1, cols[:, j])).sum(0)
    return out


def sparse_mm(x: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """The bypass forward ``y = x S^T``: ``y[t, i] = sum_j x[t, idx[i, j]] * vals[i, j]``.

    Args:
        x: ``[T, d_in]`` layer input.
        idx: ``[d_out, k]`` selected columns.
        vals: ``[d_out, k]`` values of ``S`` (the fp32 delta).

    Returns:
        ``[T, d_out]`` in ``x``'s dtype.

    Example (T = 2, d_in = 3, d_out = 2, k = 2)::

        >>> x = torch.tensor([[1., 10., 100.], [2., 20., 200.]])
        >>> idx = torch.tensor([[0, 2], [1, 2]])
        >>> vals = torch.tensor([[1., 0.5], [-1., 2.]])
        >>> sparse_mm(x, idx, vals)
        tensor([[ 51., 190.],
                [102., 380.]])

    ``y[0, 0] = x[0, 0]*1 + x[0, 2]*0.5 = 1 + 50``; ``y[0, 1] = x[0, 1]*(-1) + x[0, 2]*2 = -10 + 200``.
    """
    d_out, k = check_pattern(idx, vals)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [T, d_in] (flatten batch dims first), found shape {tuple(x.shape)}")
    acc = accumulation_dtype(x, vals)
    xf, vf, cols = x.to(acc), vals.to(acc), idx.long()
    y = torch.zeros((x.shape[0], d_out), dtype=acc, device=x.device)
    for j in range(k):
        y += xf.index_select(1, cols[:, j]) * vf[:, j]
    return y.to(x.dtype)


def sparse_mm_t(g: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor, d_in: int) -> torch.Tensor:
    """The bypass's share of ``grad_x``, ``gx = g S``: ``gx[t, c] = sum_{i, j: idx[i, j] = c} g[t, i] * vals[i, j]``.

    Args:
        g: ``[T, d_out]`` output gradient.
        idx: ``[d_out, k]`` selected columns.
        vals: ``[d_out, k]`` values of ``S``.
        d_in: the width of ``x`` (columns no row selects get zeros).

    Returns:
        ``[T, d_in]`` in ``g``'s dtype.

    Example (T = 2, d_out = 2, d_in = 3, k = 2)::

        >>> g = torch.tensor([[1., 2.], [3., 4.]])
        >>> idx = torch.tensor([[0, 2], [1, 2]])
        >>> vals = torch.tensor([[1., 0.5], [-1., 2.]])
        >>> sparse_mm_t(g, idx, vals, 3)
        tensor([[ 1.0000, -2.0000,  4.5000],
                [ 3.0000, -4.0000,  9.5000]])

    Column 2 is selected by both rows: ``gx[0, 2] = g[0, 0]*0.5 + g[0, 1]*2 = 0.5 + 4``.
    """
    d_out, k = check_pattern(idx, vals)
    _check_tokens("g", g, d_out, "d_out")
    acc = accumulation_dtype(g, vals)
    gf, vf, cols = g.to(acc), vals.to(acc), idx.long()
    gx = torch.zeros((g.shape[0], int(d_in)), dtype=acc, device=g.device)
    for j in range(k):
        gx.index_add_(1, cols[:, j], gf * vf[:, j])
    return gx.to(g.dtype)
