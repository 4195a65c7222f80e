"""The trainable NeuroAda bypass: attach fp32 deltas to a model's Linear / Conv1D weights.

For a frozen weight ``W`` (logical ``[d_out, d_in]``) and an index ``idx`` (int32 ``[d_out, k]``,
rows ascending), the bypass trains ``delta`` (fp32 ``[d_out, k]``) and the layer computes

    y = x W^T + x S^T + b,      S[i, idx[i, j]] = delta[i, j], 0 elsewhere.

Worked example (d_out=2, d_in=3, k=1): ``W = [[1, 2, 3], [4, 5, 6]]``, ``idx = [[2], [0]]``,
``delta = [[0.5], [-1]]``. Then ``S = [[0, 0, 0.5], [-1, 0, 0]]`` and ``W + S = [[1, 2, 3.5],
[3, 5, 6]]``; for ``x = [1, 1, 1]``, ``y = [6.5, 14]`` (+ b). With upstream gradient ``g = [1, 2]``
(one token), ``grad_delta[i, j] = g[i] * x[idx[i, j]] = [[1], [2]]`` and ``grad_x = g (W+S) =
[7, 12, 15.5]``.

Two ways to compute it (``mode``):

- ``"fused"`` (training default). Before every forward the selected entries of the weight are
  overwritten in place with ``W0_sel + delta`` (``W0_sel``: the base values at those positions,
  kept in the base dtype, so ``detach`` restores the base bit for bit). The forward is then one
  plain matmul with ``W' = W + S``. Backward (``_FusedBypass``): ``grad_x = g W'`` (what a frozen
  base computes anyway) and ``grad_delta = SDDMM(g^T, x)``: ``T * d_out * k`` multiply-adds in
  fp32 instead of the dense ``T * d_out * d_in`` of ``g^T x``. On CPU (fp32/bf16) the compiled
  kernel ``kernels/csrc/sddmm.c`` computes it (and ``kernels/csrc/refresh.c`` the per-forward refresh); elsewhere
  ``torch.sparse.sampled_addmm`` on the CSR pattern ``crow = arange(d_out + 1) * k, col = idx``
  (for k <= 2, and where ``sampled_addmm`` is unavailable, a per-column gather-multiply-sum
  instead). Saved for backward:
  ``x`` only (plus a Python handle on the layer); no copy of the weight, no dense weight gradient.
- ``"reference"``: ``x W^T + b`` plus ``x S^T`` with ``S`` built by ``scatter`` from ``delta``,
  plain autograd, the weight left clean. Slow and memory hungry; for tests and parity.

Module surgery. An adapted module keeps its identity, its parameters and its ``state_dict`` keys;
its class is swapped for a subclass (as ``torch.nn.utils.parametrize`` does) that adds the
parameter ``<module>.neuroada_delta`` and the non-persistent buffers ``neuroada_idx``,
``neuroada_w0`` and ``neuroada_crow``. ``state_dict()`` shows the base weight (the selected
entries are restored first; the next forward writes them again). ``load_state_dict`` of a base
weight re-captures ``W0_sel``.

Device and dtype moves after ``attach``: ``model.to(device)``, ``.cuda()``, ``.cpu()`` move the
deltas (and their grads) with the weights; ``model.to(dtype)``, ``.half()``, ``.bfloat16()``,
``.float()`` cast the base weights and ``W0_sel`` together (``detach`` then restores the cast
base) but leave deltas fp32. Build the optimizer after moving, as usual. The refresh is part of
the module's forward, so gradient checkpointing (reentrant or not) rewrites the same values when it
recomputes; the backward writes them again itself if something (``state_dict()``, ``set_mode``)
restored the base in between. CUDA takes the same path (``sampled_addmm`` has a CUDA kernel; not
exercised by the CPU test suite). Not supported while attached: pickling the whole module (save
``state_dict`` or ``make_delta_sidecar`` instead) and an optimizer step between a forward and its
backward (a ``RuntimeError`` says so). Untested: ``torch.compile`` and sharded weights (FSDP,
DeepSpeed ZeRO-3), where the in-place write would need the full weight.

Left out: which weights to adapt (``targets.py``), reading sidecar files (``sidecar.py``),
training loops (``train.py``), the streaming on-disk merge (``merge.py``).
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from neuroada_tools.kernels import native
from neuroada_tools.errors import ModelError, SidecarError
from neuroada_tools.io.names import match_names
from neuroada_tools.io.sidecar import DeltaSidecar, IndexSidecar, check_delta_matches

try:  # GPT-2 style layers store the weight as [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but keep the module importable
    Conv1D = None

__all__ = [
    "MODES", "attach", "count_trainable", "deltas", "detach", "make_delta_sidecar", "merge_in_place",
    "sddmm", "set_mode", "trainable_parameters",
]

MODES = ("fused", "reference")
DELTA_ATTR = "neuroada_delta"
_ROOT_STATE = "_neuroada_attach_state"
# SDDMM kernel: "auto" (on CPU with fp32/bf16 inputs the compiled kernel when it is available;
# otherwise "columns" for k <= _COLUMNS_MAX_K or where sampled_addmm raised, else "sampled_addmm"),
# or force "native" / "sampled_addmm" / "columns" (tests and benchmarks do)
SDDMM_BACKEND = "auto"
_NATIVE_DTYPES = (torch.float32, torch.bfloat16)  # what the compiled SDDMM and refresh take
_NATIVE_REFRESH_MAX = 1 << 16  # entries up to which the one-core compiled refresh beats torch's scatter_
_REFRESH_ENTRIES_PER_PART = 4096  # on torch's OpenMP team: rows split so each part writes this many at least
_COLUMNS_MAX_K = 2
# CPU SDDMM: at least this many tokens per part. On torch's OpenMP team (native.bind_openmp) two
# parts of 64 tokens already beat one at 384x1536 and 1024x1024 (`python bench/bench_kernels.py
# --shape 384,1536,128`); with threads started per call, at T=256 one thread beat two (starting
# a thread costs more than half of such a call), so that path keeps 256.
_TOKENS_PER_THREAD = 64
_TOKENS_PER_STARTED_THREAD = 256
_SDDMM_UNSUPPORTED: set[str] = set()  # device types where sampled_addmm raised
_L2_FLOATS = 1 << 18  # CPU SDDMM token block: d_in * block fp32 values of x^T (1 MiB) stay in L2 ...
_L3_FLOATS = 1 << 22  # ... used when the whole x^T (T * d_in fp32) is over 16 MiB


# ---------------------------------------------------------------- the math


def sddmm(g: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, crow: torch.Tensor | None = None) -> torch.Tensor:
    """``out[i, j] = sum_t g[t, i] * x[t, idx[i, j]]`` in fp32, without forming ``g^T x``.

    ``g`` is ``[T, d_out]``, ``x`` is ``[T, d_in]`` (any float dtype), ``idx`` int ``[d_out, k]``
    with rows strictly ascending; ``crow`` (``arange(d_out + 1) * k``, same dtype as ``idx``) may be
    passed to avoid rebuilding it. Returns fp32 ``[d_out, k]``.

    Example: ``g = [[1, 2]]``, ``x = [[3, 4, 5]]``, ``idx = [[2], [0]]`` gives ``[[1 * 5], [2 * 3]]
    = [[5], [6]]``.

    Three kernels (``SDDMM_BACKEND``; ``"auto"`` picks):

    - ``"native"`` (CPU, fp32 or bf16 inputs, where the compiled kernel is available):
      ``kernels/csrc/sddmm.c``, tokens split over ``torch.get_num_threads()`` threads of torch's OpenMP
      team (see there).

    - ``torch.sparse.sampled_addmm`` on the CSR pattern: it dots row ``i`` of ``g^T`` with row
      ``idx[i, j]`` of ``x^T``, so both are first copied into T-contiguous fp32 (the copy also
      upcasts bf16/fp16). On CPU, when ``x^T`` is over 16 MiB, tokens go by blocks small enough
      for a block of ``x^T`` to stay in L2 (1.5x faster at d_in=11008, T=512), accumulating in
      place (``beta=1, out=pattern``); smaller inputs take one call, since on a CPU shared with
      other jobs every call (a parallel region) can stall.
    - ``"columns"``: for each ``j``, gather ``x[:, idx[:, j]]`` ([T, d_out]), multiply by ``g`` in
      place and sum over tokens: ``k`` passes over ``T * d_out`` values but no transposes. Used for
      ``k <= 2`` (2-3x faster than the transposes alone at k=1) and where ``sampled_addmm`` raises.
    """
    d_out, k = idx.shape
    T, d_in = x.shape
    device_type = g.device.type
    backend = SDDMM_BACKEND
    if backend in ("auto", "native") and device_type == "cpu" and g.dtype == x.dtype and x.dtype in _NATIVE_DTYPES:
        lib = native.kernel()
        if lib is not None and T > 0:
            return _sddmm_native(lib, g, x, idx)
    if backend == "native":
        raise RuntimeError("SDDMM_BACKEND='native' but the kernel is unavailable for these inputs")
    if backend == "auto":
        backend = "columns" if k <= _COLUMNS_MAX_K or device_type in _SDDMM_UNSUPPORTED else "sampled_addmm"
    if backend == "columns" or T == 0:
        return _sddmm_columns(g, x, idx)
    if crow is None:
        crow = torch.arange(d_out + 1, dtype=idx.dtype, device=idx.device) * k
    block = T
    if device_type == "cpu" and T * d_in > _L3_FLOATS:  # x^T would not stay in cache: go by blocks
        block = max(64, _L2_FLOATS // max(1, d_in))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
            values = torch.zeros(d_out * k, dtype=torch.float32, device=g.device)
            pattern = torch.sparse_csr_tensor(crow, idx.reshape(-1), values, (d_out, d_in), check_invariants=False)
            for t0 in range(0, T, block):
                gb, xb = g[t0 : t0 + block], x[t0 : t0 + block]
                n = gb.shape[0]
                gT = torch.empty((d_out, n), dtype=torch.float32, device=g.device).copy_(gb.t())
                xT = torch.empty((d_in, n), dtype=torch.float32, device=x.device).copy_(xb.t())
                pattern = torch.sparse.sampled_addmm(pattern, gT, xT.t(), beta=1.0, out=pattern)
        return pattern.values().view(d_out, k)
    except (RuntimeError, NotImplementedError):
        if SDDMM_BACKEND == "sampled_addmm":
            raise
        _SDDMM_UNSUPPORTED.add(device_type)
    return _sddmm_columns(g, x, idx)




_SCRATCH = threading.local()  # per-calling-thread kernel buffers, reused across calls (no page faults)
_SCRATCH_FLOATS: dict[int, int] = {}  # d_in -> floats of scratch one SDDMM thread needs


def _scratch(name: str, numel: int) -> torch.Tensor:
    buf = getattr(_SCRATCH, name, None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=torch.float32)
        setattr(_SCRATCH, name, buf)
    return buf


def _sddmm_native(lib, g: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The C kernel (``kernels/csrc/sddmm.c``): one call, which splits the tokens into up to
    ``torch.get_num_threads()`` parts run on torch's own OpenMP team (``native.bind_openmp``; else
    on threads the kernel starts); each part sums into its own fp32 buffer, added at the end in a
    fixed order (deterministic for a given thread count). The buffers are the calling thread's,
    reused across calls, so concurrent callers are safe."""
    d_out, k = idx.shape
    T, d_in = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    g = g if g.stride(1) == 1 else g.contiguous()
    idx = idx if idx.dtype == torch.int32 and idx.is_contiguous() else idx.to(torch.int32).contiguous()
    per_part = _TOKENS_PER_THREAD if native.openmp_bound() else _TOKENS_PER_STARTED_THREAD
    threads = max(1, min(torch.get_num_threads(), T // per_part, 64))
    out = torch.empty((d_out, k), dtype=torch.float32)
    partials = _scratch("partial", max(1, (threads - 1) * d_out * k))
    per_thread = _SCRATCH_FLOATS.get(d_in)
    if per_thread is None:
        per_thread = _SCRATCH_FLOATS[d_in] = lib.neuroada_sddmm_scratch(d_in)
    scratch = _scratch("blocks", threads * per_thread)
    lib.neuroada_sddmm(int(x.dtype == torch.bfloat16), g.data_ptr(), g.stride(0), x.data_ptr(), x.stride(0),
                       idx.data_ptr(), d_out, d_in, k, T, threads, out.data_ptr(), partials.data_ptr(),
                       scratch.data_ptr())
    return out


def _sddmm_columns(g: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """SDDMM one selected column per row at a time: ``out[:, j] = sum_t g[t] * x[t, idx[:, j]]``."""
    d_out, k = idx.shape
    cols = idx.t().long().contiguous()  # [k, d_out]
    gf = g if g.dtype == torch.float32 else g.float()
    out = torch.empty((d_out, k), dtype=torch.float32, device=g.device)
    for j in range(k):
        picked = x.index_select(1, cols[j])  # [T, d_out]
        if picked.dtype != torch.float32:
            picked = picked.float()
        out[:, j] = picked.mul_(gf).sum(0)
    return out


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
            grad_delta = sddmm(g2, x.reshape(-1, d_in), layer.neuroada_idx, layer.neuroada_crow)
        if ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0)
        return grad_x, grad_delta, grad_bias, None


# ---------------------------------------------------------------- the module subclass


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
    _neuroada_dirty: bool  # W holds W0_sel + delta at the selected positions (else the base)
    # the last refresh on CPU with the kernels; any move, load or restore of the tensors resets it
    _neuroada_written: _Written | None
    _neuroada_base_cls: type

    def _neuroada_shape(self) -> tuple[int, int]:
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
        native_ok = (
            w0.dtype in _NATIVE_DTYPES and w.dtype == w0.dtype and fp32_delta and w0.is_contiguous() and idx.is_contiguous()
        )
        lib = cpu_lib if native_ok else None
        parts = 1
        if lib is not None:
            if native.openmp_bound():
                parts = max(1, min(torch.get_num_threads(), idx.numel() // _REFRESH_ENTRIES_PER_PART, 64))
            elif idx.numel() > _NATIVE_REFRESH_MAX:
                lib = None  # one core's misses against torch's threads: torch wins here
        write = None
        if lib is not None:
            logical = self._neuroada_logical(w)
            fn = lib.neuroada_refresh_f32 if w.dtype == torch.float32 else lib.neuroada_refresh_bf16
            write = (fn, (logical.data_ptr(), logical.stride(0), logical.stride(1), idx.data_ptr(),
                          w0.data_ptr(), delta.data_ptr(), idx.shape[0], idx.shape[1], parts))
            write[0](*write[1])
            torch.autograd.graph.increment_version(w)  # as torch's own in-place write would
        else:
            acc = torch.promote_types(w0.dtype, torch.float32)
            with torch.no_grad():
                self._neuroada_write((w0.to(acc) + delta.detach().to(acc)).to(w0.dtype))
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.neuroada_mode == "reference":
            return self._neuroada_reference(x)
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
            delta.data = _keep_fp32(fn, delta.data)
            if delta.grad is not None:
                delta.grad = _keep_fp32(fn, delta.grad)
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._neuroada_restore()  # state_dict shows the base weight; the next forward rewrites W'
        super()._save_to_state_dict(destination, prefix, keep_vars)  # type: ignore[misc]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._neuroada_restore()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]
        if prefix + "weight" in state_dict:  # a (new) base weight: its selected values are W0_sel
            with torch.no_grad():
                self.neuroada_w0.copy_(self._neuroada_logical(self.weight).gather(1, self.neuroada_idx))

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        extra = f"neuroada k={self.neuroada_idx.shape[1]}, mode={self.neuroada_mode}"
        return f"{base}, {extra}" if base else extra


def _keep_fp32(fn, t: torch.Tensor) -> torch.Tensor:
    new = fn(t)
    return new if new.dtype == torch.float32 else t.to(new.device)


_CLASSES: dict[type, type] = {}


def _bypass_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"NeuroAda{cls.__name__}", (_BypassMixin, cls), {"__module__": __name__})
    return _CLASSES[cls]


def _bypassed(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BypassMixin)]


@dataclass
class _AttachState:
    """What ``attach`` changed outside the adapted modules, so ``detach`` can undo it."""

    requires_grad: dict[int, tuple[nn.Parameter, bool]] = field(default_factory=dict)
    dense_backup: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)


# ---------------------------------------------------------------- public API


def attach(
    model: nn.Module, index: IndexSidecar, delta: DeltaSidecar | None = None, *, mode: str = "fused"
) -> dict[str, nn.Parameter]:
    """Add a NeuroAda bypass to every weight named in ``index``; return ``{index name: delta}``.

    Every parameter of ``model`` is frozen (``requires_grad=False``) and only the new fp32 deltas
    (zeros, or the values of ``delta``) are trainable; unfreeze a task head yourself. Index names are
    checkpoint names, mapped onto the model with ``match_names`` (``encoder.layer.0...`` finds
    ``bert.encoder.layer.0...``). With ``delta``, the sidecar must match the index
    (``check_delta_matches``: digest, names, shapes) and its dense tensors are copied into the
    model's parameters of those names (``detach`` puts the previous values back).

    Raises ``ModelError`` naming the tensor when an index tensor has no parameter in the model, its
    module is not ``nn.Linear`` / ``Conv1D``, or its shape or layout disagrees with the index entry;
    ``SidecarError`` for a malformed index row or a delta that does not match. Nothing is changed
    when an error is raised.

    Example: ``params = attach(model, read_index("m.index.safetensors"))`` then
    ``torch.optim.AdamW(params.values(), lr=7e-4)``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, found {mode!r}")
    if _bypassed(model):
        raise ModelError("model already has NeuroAda bypasses attached; call detach() first")
    param_names = [n for n, _ in model.named_parameters()]
    mapping = match_names(sorted(index.indices), param_names)
    plan = []
    for name in sorted(index.indices):
        plan.append(_check_target(model, index, name, mapping.get(name)))
    if delta is not None:
        check_delta_matches(delta, index)
    dense_plan = _check_dense(model, delta.dense) if delta is not None else []

    # everything checked: now change the model
    state = _AttachState()
    for p in model.parameters():
        state.requires_grad[id(p)] = (p, p.requires_grad)
    with torch.no_grad():
        for _, p, t in dense_plan:
            state.dense_backup.append((p, p.detach().clone()))
            p.copy_(t)
    for p in model.parameters():
        p.requires_grad_(False)
    out: dict[str, nn.Parameter] = {}
    for name, module, idx in plan:
        out[name] = _install(module, name, idx, mode, None if delta is None else delta.deltas[name])
    object.__setattr__(model, _ROOT_STATE, state)
    return out


def _adaptable(module: nn.Module) -> bool:
    """``nn.Linear`` / ``Conv1D`` or a subclass that keeps their forward (the bypass replaces it)."""
    for cls in (nn.Linear, Conv1D):
        if cls is not None and isinstance(module, cls) and type(module).forward is cls.forward:
            return True
    return False


def _check_target(
    model: nn.Module, index: IndexSidecar, name: str, pname: str | None
) -> tuple[str, nn.Module, torch.Tensor]:
    entry = index.entries.get(name)
    if entry is None:
        raise SidecarError(f"index: tensor {name!r} has no entry in neuroada.tensors")
    if pname is None:
        raise ModelError(f"index tensor {name!r}: the model has no parameter of that name")
    mod_name, _, leaf = pname.rpartition(".")
    module = model.get_submodule(mod_name) if mod_name else model
    if leaf != "weight" or not _adaptable(module):
        raise ModelError(
            f"index tensor {name!r}: model parameter {pname!r} is not the weight of an nn.Linear or "
            f"Conv1D (found {type(module).__name__}.{leaf})"
        )
    want_layout = "out_in" if isinstance(module, nn.Linear) else "in_out"
    if entry.layout != want_layout:
        raise ModelError(
            f"index tensor {name!r}: recorded layout {entry.layout!r}, but model parameter {pname!r} "
            f"belongs to {type(module).__name__}, which stores {want_layout!r}"
        )
    w = module.weight
    logical = tuple(w.shape) if want_layout == "out_in" else tuple(reversed(w.shape))
    if logical != tuple(entry.shape):
        raise ModelError(
            f"index tensor {name!r}: model weight {pname!r} has logical shape [d_out, d_in] = "
            f"{list(logical)}, the index was made for {list(entry.shape)}"
        )
    if not w.is_floating_point() or w.device.type == "meta":
        raise ModelError(
            f"index tensor {name!r}: model weight {pname!r} is {w.dtype} on {w.device}, not materialised floats"
        )
    idx = index.indices[name]
    d_out, d_in = logical
    if idx.dim() != 2 or idx.shape[0] != d_out or not 1 <= idx.shape[1] <= d_in:
        raise SidecarError(
            f"index: {name!r}: indices of shape {list(idx.shape)} do not fit [d_out={d_out}, 1..{d_in}]"
        )
    if idx.dtype not in (torch.int32, torch.int64):
        raise SidecarError(f"index: {name!r}: indices must be integers, found {idx.dtype}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= d_in):
        raise SidecarError(f"index: {name!r}: indices outside 0..{d_in - 1}")
    if idx.shape[1] > 1:
        bad = idx[:, 1:] <= idx[:, :-1]
        if bool(bad.any()):
            r, c = (int(v) for v in bad.nonzero()[0])
            raise SidecarError(
                f"index: {name!r} row {r}: indices not increasing ({int(idx[r, c])} >= {int(idx[r, c + 1])})"
            )
    return name, module, idx


def _check_dense(model: nn.Module, dense: dict[str, torch.Tensor]) -> list[tuple[str, nn.Parameter, torch.Tensor]]:
    params = dict(model.named_parameters())
    mapping = match_names(sorted(dense), list(params))
    plan = []
    for name in sorted(dense):
        if name not in mapping:
            raise ModelError(f"delta: dense tensor {name!r}: the model has no parameter of that name")
        p = params[mapping[name]]
        if tuple(p.shape) != tuple(dense[name].shape):
            raise ModelError(
                f"delta: dense tensor {name!r} has shape {list(dense[name].shape)}, model parameter "
                f"{mapping[name]!r} has {list(p.shape)}"
            )
        plan.append((mapping[name], p, dense[name]))
    return plan


def _install(module: nn.Module, name: str, idx: torch.Tensor, mode: str, init: torch.Tensor | None) -> nn.Parameter:
    w = module.weight
    layout = "out_in" if isinstance(module, nn.Linear) else "in_out"
    idx = idx.to(device=w.device, dtype=torch.int32).contiguous()  # no copy if already so
    d_out, k = idx.shape
    logical = w if layout == "out_in" else w.t()
    with torch.no_grad():
        w0 = logical.gather(1, idx)
    value = torch.zeros((d_out, k), dtype=torch.float32, device=w.device)
    if init is not None:
        value.copy_(init)
    delta = nn.Parameter(value)
    base_cls = type(module)
    module.__class__ = _bypass_class(base_cls)
    module.register_parameter(DELTA_ATTR, delta)
    module.register_buffer("neuroada_idx", idx, persistent=False)
    crow = torch.arange(d_out + 1, dtype=torch.int32, device=w.device) * k
    module.register_buffer("neuroada_crow", crow, persistent=False)
    module.register_buffer("neuroada_w0", w0, persistent=False)
    module.neuroada_name = name
    module.neuroada_mode = mode
    module.neuroada_layout = layout
    module._neuroada_dirty = False
    module._neuroada_written = None
    module._neuroada_base_cls = base_cls
    return delta


def _remove(module: nn.Module, *, keep_merged: bool) -> None:
    if keep_merged:
        module._neuroada_refresh()
    else:
        module._neuroada_restore()
    del module._parameters[DELTA_ATTR]
    for b in ("neuroada_idx", "neuroada_crow", "neuroada_w0"):
        del module._buffers[b]
    base_cls = module._neuroada_base_cls
    for a in ("neuroada_name", "neuroada_mode", "neuroada_layout", "_neuroada_dirty", "_neuroada_written", "_neuroada_base_cls"):
        module.__dict__.pop(a, None)
    module.__class__ = base_cls


def _finish(model: nn.Module, *, keep_merged: bool) -> None:
    for _, m in _bypassed(model):
        _remove(m, keep_merged=keep_merged)
    states = [m.__dict__.pop(_ROOT_STATE) for m in model.modules() if _ROOT_STATE in m.__dict__]
    for state in states:
        _undo(state, keep_merged=keep_merged)


def _undo(state: _AttachState, *, keep_merged: bool) -> None:
    with torch.no_grad():
        if not keep_merged:
            for p, backup in state.dense_backup:
                p.copy_(backup)
    for p, flag in state.requires_grad.values():
        p.requires_grad_(flag)


def detach(model: nn.Module) -> None:
    """Remove every bypass: weights are the base bit for bit again (the base as cast by any
    ``model.to(dtype)`` since ``attach``), deltas and buffers are gone, the modules have their
    original class, ``requires_grad`` flags and dense tensors loaded by ``attach`` are as before.
    A model without bypasses is left as it is."""
    _finish(model, keep_merged=False)


def merge_in_place(model: nn.Module) -> None:
    """Bake the deltas into the weights and remove the bypasses.

    Each selected entry becomes ``cast(fp32(W0) + delta)`` in the weight's dtype, computed once;
    every other entry is untouched. This is exactly the weight the fused forward uses, so the
    merged model's logits equal the fused bypass's. Example: bf16 ``W0 = 1.0``, ``delta = 2**-9``
    gives ``bf16(1.001953125) = 1.0`` (below bf16 resolution), while ``delta = 2**-7`` gives
    ``1.0078125``. ``requires_grad`` flags are restored; dense tensors loaded by ``attach`` stay.
    """
    _finish(model, keep_merged=True)


def set_mode(model: nn.Module, mode: str) -> None:
    """Switch every bypass between ``"fused"`` and ``"reference"``; the weights are left clean."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, found {mode!r}")
    layers = _bypassed(model)
    if not layers:
        raise ModelError("model has no NeuroAda bypasses; call attach() first")
    for _, m in layers:
        m._neuroada_restore()
        m.neuroada_mode = mode


def deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{index name: fp32 [d_out, k] delta}``, detached clones (safe to keep while training)."""
    return {m.neuroada_name: m.neuroada_delta.detach().clone() for _, m in _bypassed(model)}


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every parameter with ``requires_grad``: after ``attach`` the deltas
    (``<module>.neuroada_delta``) plus anything unfrozen since, e.g. a task head."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def count_trainable(model: nn.Module) -> int:
    """Number of trainable scalars. Example: one 4096x4096 Linear at k=20 gives 4096 * 20 = 81920."""
    return sum(p.numel() for _, p in trainable_parameters(model))


def make_delta_sidecar(
    model: nn.Module,
    index: IndexSidecar,
    *,
    dense: dict[str, torch.Tensor] | None = None,
    task: str = "",
    info: dict | None = None,
) -> DeltaSidecar:
    """A ``DeltaSidecar`` holding the model's current deltas for every tensor of ``index``.

    ``dense`` (model parameter name -> tensor, e.g. a trained classifier) is stored as detached fp32
    copies. Raises ``ModelError`` if an index tensor has no bypass in ``model``.
    """
    current = deltas(model)
    missing = [n for n in sorted(index.indices) if n not in current]
    if missing:
        raise ModelError(f"index tensor {missing[0]!r} has no NeuroAda bypass in the model")
    extra = sorted(set(current) - set(index.indices))
    if extra:
        raise ModelError(f"the model has a bypass for {extra[0]!r}, which is not in the index")
    return DeltaSidecar(
        index_digest=index.digest,
        deltas={n: current[n] for n in sorted(index.indices)},
        dense={n: t.detach().to(torch.float32).clone() for n, t in (dense or {}).items()},
        task=task,
        info=dict(info or {}),
    )
