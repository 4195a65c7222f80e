"""The bypass term on its own, ``y = x S^T``, as an autograd function that never touches the weight.

``SparseLinearAdd`` computes only the sparse term; the caller adds it to the frozen layer's own
output (``F.linear(x, W, b) + sparse_linear_add(x, idx, delta)``). Nothing here reads or writes
``W``, so it works where a process does not hold the full weight: FSDP2 shards ``W`` across ranks,
while ``idx`` and ``delta`` (``d_out * k``, small) stay whole on each one. This is the
sharding-safe bypass path; the fused path (refresh ``W`` in place, one matmul) stays the default
wherever the full weight is held.

- forward:  ``y = sparse_mm(x, idx, delta)``, ``[..., d_out]`` in ``x``'s dtype;
- backward: ``grad_x = sparse_mm_t(g, idx, delta, d_in)`` (the bypass's share; autograd adds the
  dense share ``g W`` from the frozen layer) and ``grad_delta = sddmm(g, x, idx)`` (fp32).

``backend`` picks the implementation of the three products: ``"torch"`` (``reference.py``, any
device and dtype, float64 included) or ``"triton"`` (``triton_kernels.py``: CUDA, or CPU under
``TRITON_INTERPRET=1``; bf16/fp16/fp32; raises ``TritonUnavailable`` where it cannot run, never
falls back). Leading batch dims of ``x`` are flattened here, not by the kernels.
"""

from __future__ import annotations

from typing import Any

import torch

from neuroada_tools.kernels import ops as kernel_ops  # noqa: F401  (registers torch.ops.neuroada.*)
from neuroada_tools.kernels import reference

__all__ = ["BACKENDS", "SparseLinearAdd", "sparse_linear_add"]

BACKENDS = ("torch", "triton")


def _ops(backend: str) -> Any:
    if backend == "torch":
        return reference
    if backend == "triton":
        from neuroada_tools.kernels import triton_kernels

        return triton_kernels
    raise ValueError(f"unknown sparse bypass backend {backend!r}: expected one of {', '.join(BACKENDS)}")


class SparseLinearAdd(torch.autograd.Function):
    """``y = x S^T`` with ``S`` holding ``delta`` at ``idx``; gradients for ``x`` and ``delta``.

    ``apply(x, delta, idx, backend="torch", plan=None)``: ``x`` ``[..., d_in]``, ``delta`` and
    ``idx`` ``[d_out, k]``. ``plan`` (triton only) is ``triton_kernels.column_plan(idx, d_in)``,
    built once per index by the caller; without it the backward builds one per call.
    """

    @staticmethod
    def forward(ctx, x, delta, idx, backend="torch", plan=None):  # type: ignore[override]
        ops = _ops(backend)
        d_out, _ = reference.check_pattern(idx, delta)
        d_in = x.shape[-1]
        y = ops.sparse_mm(x.reshape(-1, d_in), idx, delta)
        ctx.backend, ctx.plan, ctx.x_shape = backend, plan, x.shape
        ctx.save_for_backward(
            x if ctx.needs_input_grad[1] else None,
            delta if ctx.needs_input_grad[0] else None,
            idx,
        )
        return y.view(*x.shape[:-1], d_out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # type: ignore[override]
        x, delta, idx = ctx.saved_tensors
        ops = _ops(ctx.backend)
        d_out, d_in = idx.shape[0], ctx.x_shape[-1]
        g2 = g.reshape(-1, d_out)
        grad_x = grad_delta = None
        if ctx.needs_input_grad[0]:
            if ctx.backend == "triton":
                grad_x = ops.sparse_mm_t(g2, idx, delta, d_in, ctx.plan)
            else:
                grad_x = ops.sparse_mm_t(g2, idx, delta, d_in)
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            if ctx.backend == "torch":  # the op: the compiled SDDMM on CPU where it applies
                grad_delta = torch.ops.neuroada.sddmm(g2, x.reshape(-1, d_in), idx)
            else:
                grad_delta = ops.sddmm(g2, x.reshape(-1, d_in), idx)
        return grad_x, grad_delta, None, None, None


def sparse_linear_add(x: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor, backend: str = "torch",
                      plan: Any = None) -> torch.Tensor:
    """``x S^T`` (``[..., d_out]``) with autograd through ``SparseLinearAdd``; see the module docstring.

    Example::

        >>> x = torch.tensor([[1., 10., 100.]], requires_grad=True)
        >>> delta = torch.zeros(2, 2, requires_grad=True)
        >>> idx = torch.tensor([[0, 2], [1, 2]])
        >>> sparse_linear_add(x, idx, delta).sum().backward()
        >>> delta.grad  # row i, slot j: sum over tokens of g[t, i] * x[t, idx[i, j]], g = 1
        tensor([[  1., 100.],
                [ 10., 100.]])
    """
    return SparseLinearAdd.apply(x, delta, idx, backend, plan)
