"""The fused bypass's autograd function: ``y = x W'^T + b`` with ``W'`` refreshed in place, and
its backward, ``grad_x = g W'`` (what a frozen base computes anyway) and ``grad_delta`` by the
SDDMM op ``neuroada::sddmm`` (``kernels/``), never the dense ``g^T x``."""

from __future__ import annotations

import torch

from neuroada_tools.kernels import ops as kernel_ops  # noqa: F401  (registers torch.ops.neuroada.*)


class _FusedBypass(torch.autograd.Function):
    """``y = x W'^T + b`` with ``W'`` already refreshed in place; gradients for ``x`` and ``delta``.

    Inputs: ``x`` (any leading dims), ``delta`` (the layer's fp32 parameter, only for autograd
    bookkeeping), ``bias`` (may be ``None``), ``layer`` (the adapted module). Saves ``x``.
    """

    @staticmethod
    def forward(ctx, x, delta, bias, layer):  # type: ignore[override]
        ctx.layer = layer
        ctx.delta_version = delta._version
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None)
        return layer._neuroada_dense(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # type: ignore[override]
        layer = ctx.layer
        (x,) = ctx.saved_tensors
        delta = layer.neuroada_delta
        if delta._version != ctx.delta_version:
            raise RuntimeError(
                f"NeuroAda delta of {layer.neuroada_name!r} was modified between forward and backward "
                "(optimizer step before backward?)"
            )
        d_out, d_in = layer._neuroada_shape()
        g2 = g.reshape(-1, d_out)
        grad_x = grad_delta = grad_bias = None
        if ctx.needs_input_grad[0]:
            if not layer._neuroada_dirty:  # something (state_dict, set_mode) restored the base since
                layer._neuroada_refresh()
            w = layer.weight
            if w.dtype != g2.dtype:
                w = w.to(g2.dtype)
            wl = w if layer.neuroada_layout == "out_in" else w.t()  # logical [d_out, d_in]
            grad_x = (g2 @ wl).view(*g.shape[:-1], d_in)
        if ctx.needs_input_grad[1]:
            grad_delta = torch.ops.neuroada.sddmm(g2, x.reshape(-1, d_in), layer.neuroada_idx)
        if ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0)
        return grad_x, grad_delta, grad_bias, None
