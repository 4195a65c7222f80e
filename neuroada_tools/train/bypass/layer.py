"""The adapted layer: a subclass of ``nn.Linear`` / ``Conv1D`` made by ``attach``, holding the delta,
the index row buffers and the base values at the selected positions; its forward refreshes the
selected entries of the weight (``_neuroada_refresh``) and runs one matmul.

Where a process does not hold the whole weight (FSDP2 shards it over ranks, issue 8), the
``sparse`` mode runs instead: ``y = x W^T + b + x S^T`` with ``S`` the delta at the selected
columns, never formed as a matrix; ``grad_x = g W + g S`` and ``grad_delta = sddmm(g, x, idx)``
(``kernels/sparse_add.py``; the Triton kernels on GPU, torch and the compiled SDDMM on CPU). Why
this and not the fused refresh applied to the unsharded weight inside FSDP's all-gather: FSDP2
frees the unsharded weight after forward and gathers it again from the shards before backward,
so a refresh written into it would be gone by then (backward's ``g W'`` would lose the delta),
and writing it into the shards instead would make every rank's shard hold trained values, so
the base would no longer be the base. The sparse add never writes the weight, costs
``2 T d_out k`` extra multiply-adds per pass (small next to ``T d_out d_in``), and its state is the
delta and index alone, which FSDP2 shards or replicates like any parameter and buffer."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from neuroada_tools.errors import ModelError
from neuroada_tools.kernels import native
from neuroada_tools.kernels import ops as kernel_ops  # noqa: F401  (registers torch.ops.neuroada.*)
from neuroada_tools.kernels.backend import choose as choose_backend
from neuroada_tools.kernels.refresh import native_call, reference_refresh_
from neuroada_tools.kernels.sparse_add import sparse_linear_add
from neuroada_tools.train.bypass.config import (
    DELTA_ATTR,
    keep_fp32,
)
from neuroada_tools.train.bypass.ops import _FusedBypass

_NATIVE_REFRESH_MAX = 1 << 16  # entries up to which the one-core compiled refresh beats torch's scatter_
_REFRESH_ENTRIES_PER_PART = 4096  # on torch's OpenMP team: rows split so each part writes this many at least


_set_attr = object.__setattr__  # for plain (non-tensor, non-module) attributes: skips nn.Module.__setattr__'s checks


class _Written(NamedTuple):
    """The last refresh on CPU with the kernels (``_BypassMixin._neuroada_written``)."""

    kept: torch.Tensor  # a copy of the delta's bits as written
    lib: object  # the kernel library (its compare)
    kept_ptr: int
    delta_ptr: int
    w_ptr: int
    w_version: int  # W's version counter after the write
    write: tuple | None  # the kernel call made, (function, arguments), or None where torch wrote


class _BypassMixin:
    """Mixed into a dynamic subclass of ``nn.Linear`` / ``Conv1D`` by ``attach``."""

    neuroada_delta: nn.Parameter
    neuroada_idx: torch.Tensor  # int32 [d_out, k]
    neuroada_crow: torch.Tensor  # int32 [d_out + 1]
    neuroada_w0: torch.Tensor  # base dtype [d_out, k]
    neuroada_name: str
    neuroada_mode: str
    neuroada_layout: str
    neuroada_quant: str | None  # the quantization of the frozen layer (quant.py), or None
    _neuroada_dirty: bool  # W holds W0_sel + delta at the selected positions (else the base)
    # the last refresh on CPU with the kernels; any move, load or restore of the tensors resets it
    _neuroada_written: _Written | None
    _neuroada_base_cls: type

    def _neuroada_shape(self) -> tuple[int, int]:
        if self.neuroada_quant is not None:  # the stored weight may be packed codes
            return int(self.out_features), int(self.in_features)
        w = self.weight
        return (w.shape[0], w.shape[1]) if self.neuroada_layout == "out_in" else (w.shape[1], w.shape[0])

    def _neuroada_logical(self, w: torch.Tensor) -> torch.Tensor:
        return w if self.neuroada_layout == "out_in" else w.t()

    def _neuroada_write(self, values: torch.Tensor) -> None:
        with torch.no_grad():
            self._neuroada_logical(self.weight).scatter_(1, self.neuroada_idx, values)

    def _neuroada_refresh(self) -> None:
        """Write ``cast(fp32(W0_sel) + delta)`` (fp64 for an fp64 base) at the selected positions.

        On CPU with an fp32 or bf16 base, the compiled kernel (``kernels/csrc/refresh.c``) does it: one
        pass over the d_out*k entries with the lines it writes prefetched a few rows ahead, no
        temporaries, the same bits as the torch expression below, its rows split over torch's
        OpenMP team (``native.bind_openmp``) from 8192 entries on. ``python bench/bench_kernels.py``:
        1.5-3.8x faster than ``scatter_`` at every shape measured. Without a team (torch not on
        OpenMP) it runs on one core, and refreshes of over ``_NATIVE_REFRESH_MAX`` entries take
        torch, whose two threads win there.

        On CPU with the compiled kernels, the refresh is skipped when ``W`` already holds the
        values for the delta as it is now: same weight storage, no in-place write to it since (its
        version counter), and the delta's bits equal those last written (a ``memcmp`` against a
        kept copy, not the delta's version: fused optimizers and ``.data`` writes don't bump
        versions). So gradient-accumulation micro-batches, gradient-checkpointing recomputes and
        evaluation passes pay one refresh per optimizer step, at the cost of 4 bytes per delta
        entry and a compare on every forward (the last column of ``bench_kernels.py``'s refresh
        table)."""
        bufs = self._buffers
        w0, idx, delta, w = bufs["neuroada_w0"], bufs["neuroada_idx"], self._parameters[DELTA_ATTR], self.weight
        if torch.compiler.is_compiling():  # traced: the registered op, no Python-side skip record
            torch.ops.neuroada.refresh_(self._neuroada_logical(w), idx, w0, delta)
            _set_attr(self, "_neuroada_dirty", True)
            return
        # Every Python operation here costs microseconds right after a large matmul (cold caches),
        # so the common case (nothing changed) is a handful of them: one record, one C compare.
        rec = self._neuroada_written
        _set_attr(self, "_neuroada_written", None)
        kept = None
        if rec is not None:
            kept, lib, kept_ptr, delta_ptr, w_ptr, w_version, write = rec
            if delta.data_ptr() == delta_ptr and kept.numel() == delta.numel():
                changed = lib.neuroada_keep_if_changed(kept_ptr, delta_ptr, kept.numel() * 4)  # kept := delta
                if self._neuroada_dirty and w._version == w_version and w.data_ptr() == w_ptr:
                    if not changed:
                        _set_attr(self, "_neuroada_written", rec)
                        return
                    if write is not None:  # the same tensors as last time: the same kernel call
                        write[0](*write[1])
                        torch.autograd.graph.increment_version(w)
                        _set_attr(self, "_neuroada_written", _Written(*rec[:5], w._version, write))
                        return
            else:
                kept = None
        cpu_lib = native.kernel() if w.device.type == "cpu" else None
        fp32_delta = delta.dtype == torch.float32 and delta.is_contiguous()
        if kept is None and cpu_lib is not None and fp32_delta:
            kept = delta.detach().clone()
        parts = 1
        if cpu_lib is not None and native.openmp_bound():
            parts = max(1, min(torch.get_num_threads(), idx.numel() // _REFRESH_ENTRIES_PER_PART, 64))
        logical = self._neuroada_logical(w)
        write = native_call(cpu_lib, logical, idx, w0, delta, parts) if cpu_lib is not None else None
        if write is not None and parts == 1 and not native.openmp_bound() and idx.numel() > _NATIVE_REFRESH_MAX:
            write = None  # one core's misses against torch's threads: torch wins here
        if write is not None:
            write[0](*write[1])
            torch.autograd.graph.increment_version(w)  # as torch's own in-place write would
        else:
            reference_refresh_(logical, idx, w0, delta)
        _set_attr(self, "_neuroada_dirty", True)
        if kept is not None and cpu_lib is not None:
            _set_attr(self, "_neuroada_written",
                      _Written(kept, cpu_lib, kept.data_ptr(), delta.data_ptr(), w.data_ptr(), w._version, write))

    def _neuroada_restore(self) -> None:
        """Write the base values back; the weight is then the base bit for bit."""
        self._neuroada_written = None
        if self._neuroada_dirty:
            self._neuroada_write(self.neuroada_w0)
            self._neuroada_dirty = False

    def _neuroada_dense(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if self.neuroada_layout == "out_in":
            return F.linear(x, w, b)
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.addmm(b, x2, w) if b is not None else x2 @ w
        return y.view(*x.shape[:-1], w.shape[1])

    def _neuroada_reference(self, x: torch.Tensor) -> torch.Tensor:
        self._neuroada_restore()
        y = self._neuroada_dense(x)
        d_out, d_in = self._neuroada_shape()
        delta = self.neuroada_delta
        acc = torch.promote_types(y.dtype, torch.float32)
        s = torch.zeros((d_out, d_in), dtype=acc, device=delta.device)
        s = s.scatter(1, self.neuroada_idx.long(), delta.to(acc))
        return y + F.linear(x.to(acc), s).to(y.dtype)

    def _neuroada_sparse(self, x: torch.Tensor) -> torch.Tensor:
        self._neuroada_restore()  # the weight stays the base: nothing is ever written to it
        backend = "triton" if choose_backend(x.device) == "triton" else "torch"
        return self._neuroada_dense(x) + sparse_linear_add(x, self.neuroada_idx, self.neuroada_delta, backend)

    def _neuroada_quantized(self, x: torch.Tensor) -> torch.Tensor:
        """``layer(x) + x S^T`` over a quantized layer (``quant.py``): its own dequantizing forward,
        then the sparse term (or, in ``reference`` mode, a dense ``S``); the weight is never read."""
        y = self._neuroada_base_cls.forward(self, x)
        if self.neuroada_mode == "reference":
            d_out, d_in = self._neuroada_shape()
            delta = self.neuroada_delta
            s = torch.zeros((d_out, d_in), dtype=torch.float32, device=delta.device)
            s = s.scatter(1, self.neuroada_idx.long(), delta)
            return y + F.linear(x.float(), s).to(y.dtype)
        backend = "triton" if choose_backend(x.device) == "triton" else "torch"
        return y + sparse_linear_add(x, self.neuroada_idx, self.neuroada_delta, backend).to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.neuroada_quant is not None:
            return self._neuroada_quantized(x)
        if self.neuroada_mode == "reference":
            return self._neuroada_reference(x)
        if self.neuroada_mode == "sparse":
            return self._neuroada_sparse(x)
        if self.weight.requires_grad:
            raise ModelError(
                f"{self.neuroada_name!r}: the base weight requires grad; NeuroAda trains the deltas only"
            )
        self._neuroada_refresh()
        delta, b = self.neuroada_delta, self.bias
        if torch.is_grad_enabled() and (
            delta.requires_grad or x.requires_grad or (b is not None and b.requires_grad)
        ):
            return _FusedBypass.apply(x, delta, b, self)
        return self._neuroada_dense(x)

    def _apply(self, fn, recurse=True):
        """Like ``nn.Module._apply`` (``.to``, ``.cuda``, ``.half``, ``share_memory`` ...), except that
        the delta and its grad follow device moves but never a dtype change: they stay fp32."""
        delta = self._parameters.pop(DELTA_ATTR)
        self._neuroada_written = None  # a new weight tensor (device, dtype): refresh it next forward
        try:
            out = super()._apply(fn, recurse)  # type: ignore[misc]
        finally:
            self._parameters[DELTA_ATTR] = delta
        with torch.no_grad():
            delta.data = keep_fp32(fn, delta.data)
            if delta.grad is not None:
                delta.grad = keep_fp32(fn, delta.grad)
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._neuroada_restore()  # state_dict shows the base weight; the next forward rewrites W'
        super()._save_to_state_dict(destination, prefix, keep_vars)  # type: ignore[misc]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._neuroada_restore()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]
        # a (new) base weight: its selected values are W0_sel (a quantized layer keeps none)
        if prefix + "weight" in state_dict and self.neuroada_quant is None:
            with torch.no_grad():
                self.neuroada_w0.copy_(self._neuroada_logical(self.weight).gather(1, self.neuroada_idx))

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        extra = f"neuroada k={self.neuroada_idx.shape[1]}, mode={self.neuroada_mode}"
        return f"{base}, {extra}" if base else extra


_CLASSES: dict[type, type] = {}


def _bypass_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"NeuroAda{cls.__name__}", (_BypassMixin, cls), {"__module__": __name__})
    return _CLASSES[cls]
