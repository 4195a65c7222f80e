"""The kernels as torch ops (``torch.ops.neuroada.*``), so ``torch.compile``, meta tensors and
``torch.library.opcheck`` see them as single operations with known output shapes.

=========================== ============================================== =====================
op                          computes                                       implementation
=========================== ============================================== =====================
``sddmm(g, x, idx)``        ``out[i, j] = sum_t g[t, i] x[t, idx[i, j]]``  ``kernels/sddmm.py``
                            (fp32 ``[d_out, k]``)
``select_rows(w, k, l)``    per-row top-k of ``|w|`` (``l``: largest),     ``kernels/topk.py``
                            int32 ``[d_out, k]``, rows ascending
``refresh_(w, idx, w0, d)`` ``w[i, idx[i, j]] = cast(w0[i, j] + d[i, j])`` ``kernels/refresh.py``
                            in place
=========================== ============================================== =====================

Each implementation dispatches itself: the compiled C kernel on CPU where it applies, a pure torch
path otherwise (other devices, no C compiler, dtypes the C code does not take). The fake (meta)
implementations below give the output shapes without computing anything.

Example: ``torch.ops.neuroada.sddmm(torch.tensor([[1., 2.]]), torch.tensor([[3., 4., 5.]]),
torch.tensor([[2], [0]], dtype=torch.int32))`` is ``[[5.], [6.]]``.
"""

from __future__ import annotations

import torch

from neuroada_tools.kernels import refresh as _refresh
from neuroada_tools.kernels import sddmm as _sddmm
from neuroada_tools.kernels import topk as _select


@torch.library.custom_op("neuroada::sddmm", mutates_args=())
def sddmm(g: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """SDDMM of the delta gradient; see ``kernels/sddmm.py``."""
    return _sddmm.sddmm(g, x, idx)


@sddmm.register_fake
def _(g: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return g.new_empty((idx.shape[0], idx.shape[1]), dtype=torch.float32)


@torch.library.custom_op("neuroada::select_rows", mutates_args=())
def select_rows(weight: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Per-row top-k of ``|weight|``; see ``kernels/topk.py``."""
    return _select.select_magnitude(weight, k, largest)


@select_rows.register_fake
def _(weight: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    return weight.new_empty((weight.shape[0], k), dtype=torch.int32)


@torch.library.custom_op("neuroada::refresh_", mutates_args=("w",))
def refresh_(w: torch.Tensor, idx: torch.Tensor, w0: torch.Tensor, delta: torch.Tensor) -> None:
    """The bypass refresh, in place; see ``kernels/refresh.py``."""
    _refresh.refresh_(w, idx, w0, delta)


@refresh_.register_fake
def _(w: torch.Tensor, idx: torch.Tensor, w0: torch.Tensor, delta: torch.Tensor) -> None:
    return None
