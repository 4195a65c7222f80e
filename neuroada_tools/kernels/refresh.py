"""The bypass refresh: write ``cast(fp32(W0_sel) + delta)`` at the selected entries of a weight.

``refresh_`` is the whole operation (the compiled kernel ``csrc/refresh.c`` on CPU where it
applies, else torch's ``scatter_``); ``kernels/ops.py`` registers it as the mutating torch op
``neuroada::refresh_``. The fused layer (``train/bypass/layer.py``) calls ``native_call`` itself on
its hot path, so it can keep the prepared call and skip a refresh whose inputs did not change.

Worked example: fp32 ``W = [[1, 2, 3]]``, ``idx = [[2]]``, ``W0_sel = [[3]]``, ``delta = [[0.5]]``
gives ``W = [[1, 2, 3.5]]``; refreshing again with ``delta = [[0]]`` writes the base ``3`` back.
"""

from __future__ import annotations

import torch

from neuroada_tools.kernels import native
from neuroada_tools.kernels.sddmm import NATIVE_DTYPES


def reference_refresh_(w: torch.Tensor, idx: torch.Tensor, w0: torch.Tensor, delta: torch.Tensor) -> None:
    """``w[i, idx[i, j]] = cast(acc(w0[i, j]) + acc(delta[i, j]))`` with ``acc`` fp32 (fp64 for an
    fp64 base); ``w`` is the logical ``[d_out, d_in]`` weight (a transposed view is fine)."""
    acc = torch.promote_types(w0.dtype, torch.float32)
    with torch.no_grad():
        w.scatter_(1, idx.long(), (w0.to(acc) + delta.detach().to(acc)).to(w0.dtype))


def native_call(lib, w: torch.Tensor, idx: torch.Tensor, w0: torch.Tensor, delta: torch.Tensor,
                parts: int) -> tuple | None:
    """``(function, arguments)`` of the compiled refresh for these tensors, or None where it does
    not apply (not CPU fp32/bf16, mismatched dtypes, non-contiguous rows or delta)."""
    if not (w.device.type == "cpu" and w0.dtype in NATIVE_DTYPES and w.dtype == w0.dtype
            and delta.dtype == torch.float32 and delta.is_contiguous() and w0.is_contiguous()
            and idx.dtype == torch.int32 and idx.is_contiguous()):
        return None
    fn = lib.neuroada_refresh_f32 if w.dtype == torch.float32 else lib.neuroada_refresh_bf16
    return fn, (w.data_ptr(), w.stride(0), w.stride(1), idx.data_ptr(), w0.data_ptr(), delta.data_ptr(),
                idx.shape[0], idx.shape[1], parts)


def refresh_(w: torch.Tensor, idx: torch.Tensor, w0: torch.Tensor, delta: torch.Tensor) -> None:
    """Refresh ``w`` in place (compiled kernel where it applies, one part; else torch)."""
    lib = native.kernel() if w.device.type == "cpu" else None
    call = native_call(lib, w, idx, w0, delta, 1) if lib is not None else None
    if call is None:
        reference_refresh_(w, idx, w0, delta)
        return
    call[0](*call[1])
