"""Triton backends of the three bypass products (``reference.py`` is their contract): launchers and plans.

- ``sddmm(g, x, idx)``: ``grad_delta``, ``[d_out, k]`` fp32.
- ``sparse_mm(x, idx, vals)``: the sharding-safe bypass forward ``x S^T``.
- ``sparse_mm_t(g, idx, vals, d_in, plan)``: its ``grad_x`` share ``g S``, through a column plan
  (``column_plan(idx, d_in)``, a CSC transpose of ``idx``, built once per index and reused every step).

They read bf16, fp16 or fp32 token tensors as they come (any strides; no upcast copy, no transpose)
and accumulate in fp32; the kernel bodies and their tiling are in ``triton_src.py``.

Where they run: on CUDA tensors, compiled; on CPU tensors only under ``TRITON_INTERPRET=1``
(Triton's interpreter: slow, but the same kernel code, which is how CI checks them without a GPU).
Anything else raises ``TritonUnavailable``; nothing here falls back to torch silently. Importing
this module does not import triton: ``available()`` says whether it can be imported, and the first
launch imports it.

Determinism: no atomics. ``sddmm`` with more than one token split sums fixed ``[splits, d_out, k]``
partials in a fixed order; ``sparse_mm_t`` sums each column in one program. Same inputs, same bits.

What this file leaves out: the torch.library op registration and the backend choice
(``NEUROADA_KERNELS``), which live with the ops module; autotuning (block sizes are fixed defaults,
overridable per call).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from typing import Any, NamedTuple

import torch

from neuroada_tools.errors import NeuroAdaError
from neuroada_tools.kernels.reference import check_pattern

__all__ = [
    "ColumnPlan", "TritonUnavailable", "available", "column_plan", "sddmm", "sparse_mm", "sparse_mm_t",
]

# Default tiles. sddmm: BLOCK_R rows at one slot, UNROLL tokens per unrolled step; sparse_mm: a
# [BLOCK_T, BLOCK_R] tile of y; sparse_mm_t: a [BLOCK_T, BLOCK_C] tile of gx. Chosen (untimed, no GPU
# at hand yet) to keep registers per thread at or under ~128 on sm_90 (ptxas: sddmm 32, sparse_mm
# 114, sparse_mm_t 58; no spills), so enough warps stay resident to hide the gathers' latency.
SDDMM_BLOCKS = {"BLOCK_R": 128, "UNROLL": 8}
SPARSE_MM_BLOCKS = {"BLOCK_T": 32, "BLOCK_R": 64}
SPARSE_MM_T_BLOCKS = {"BLOCK_T": 64}
COLUMN_BLOCK = 32  # BLOCK_C of sparse_mm_t; fixed in the plan (its per-block loop counts depend on it)
# Launch options: FMA contraction explicitly on (Triton 3.9 warns when it is left to its default).
_LAUNCH = {
    "sddmm_kernel": {"num_warps": 4, "enable_fp_fusion": True},
    "sparse_mm_kernel": {"num_warps": 4, "enable_fp_fusion": True},
    "sparse_mm_t_kernel": {"num_warps": 8, "enable_fp_fusion": True},
}
_TOKEN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

_lock = threading.Lock()
_jitted: dict[bool, dict[str, Any]] = {}


class TritonUnavailable(NeuroAdaError):
    """The Triton backend cannot run here: triton is not installed, or CPU tensors without TRITON_INTERPRET=1."""


def available() -> bool:
    """Whether triton can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _triton():
    try:
        import triton
    except ImportError as e:
        raise TritonUnavailable(
            f"the Triton kernels need the 'triton' package, which cannot be imported ({e}); "
            "install it with: pip install triton (scripts/setup.sh does)"
        ) from e
    return triton


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``), read now."""
    triton = _triton()
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels(device: torch.device) -> dict[str, Any]:
    """The jitted kernels for the current mode (compiled, or interpreted under TRITON_INTERPRET=1)."""
    triton = _triton()
    interp = interpreting()
    if device.type == "cpu" and not interp:
        raise TritonUnavailable(
            "the Triton kernels got CPU tensors but TRITON_INTERPRET=1 is not set: "
            "they run compiled on CUDA tensors, and on CPU only in Triton's interpreter"
        )
    if device.type not in ("cpu", "cuda"):
        raise TritonUnavailable(f"the Triton kernels run on CUDA (or CPU under TRITON_INTERPRET=1), not {device.type}")
    with _lock:
        if interp not in _jitted:
            from neuroada_tools.kernels import triton_src

            # triton.jit decides compiled vs interpreted when it decorates, from the same setting.
            _jitted[interp] = {
                name: triton.jit(getattr(triton_src, name))
                for name in ("sddmm_kernel", "sparse_mm_kernel", "sparse_mm_t_kernel")
            }
        return _jitted[interp]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_tokens(name: str, t: torch.Tensor, width: int | None, what: str) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [T, {what}] (flatten batch dims first), found shape {tuple(t.shape)}")
    if width is not None and t.shape[1] != width:
        raise ValueError(f"{name} has {t.shape[1]} columns, expected {what} = {width}")
    _check_dtype(name, t)


def _check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _TOKEN_DTYPES:
        raise TypeError(f"the Triton kernels take bf16, fp16 or fp32 {name}, found {t.dtype} (use the torch backend)")


def _same_device(*tensors: torch.Tensor) -> torch.device:
    dev = tensors[0].device
    for t in tensors[1:]:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device, found {dev} and {t.device}")
    return dev


def _sddmm_splits(device: torch.device, programs: int, T: int) -> int:
    """How many token splits keep a GPU busy: about 8 programs per SM, each with >= 256 tokens."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(_cdiv(8 * sms, programs), T // 256, 65535))


def sddmm(g: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, *, splits: int | None = None,
          BLOCK_R: int | None = None, UNROLL: int | None = None) -> torch.Tensor:
    """``out[i, j] = sum_t g[t, i] * x[t, idx[i, j]]`` (``reference.sddmm``), ``[d_out, k]`` fp32.

    ``splits`` cuts the tokens into that many ranges run by separate programs (default: 1 on CPU,
    enough to fill the GPU otherwise); their fp32 partials are summed in a fixed order.
    """
    d_out, k = check_pattern(idx)
    _check_tokens("g", g, d_out, "d_out")
    _check_tokens("x", x, None, "d_in")
    if x.shape[0] != g.shape[0]:
        raise ValueError(f"x has {x.shape[0]} tokens, g has {g.shape[0]}")
    dev = _same_device(g, x, idx)
    T = int(g.shape[0])
    if T == 0 or d_out == 0 or k == 0:
        return torch.zeros((d_out, k), dtype=torch.float32, device=dev)
    kern = _kernels(dev)["sddmm_kernel"]
    br, unroll = BLOCK_R or SDDMM_BLOCKS["BLOCK_R"], UNROLL or SDDMM_BLOCKS["UNROLL"]
    n_blocks = _cdiv(d_out, br)
    if n_blocks > 65535:
        raise ValueError(f"d_out {d_out} needs more than 65535 row blocks of {br}")
    n_split = max(1, min(int(splits if splits is not None else _sddmm_splits(dev, n_blocks * k, T)), T, 65535))
    t_per_split = _cdiv(T, n_split)
    n_split = _cdiv(T, t_per_split)
    out = torch.empty((n_split, d_out, k), dtype=torch.float32, device=dev)
    kern[(n_blocks, k, n_split)](
        g, x, idx, out, d_out, t_per_split, T,
        g.stride(0), g.stride(1), x.stride(0), x.stride(1), idx.stride(0), idx.stride(1), out.stride(0), out.stride(1),
        BLOCK_R=br, UNROLL=unroll, **_LAUNCH["sddmm_kernel"],
    )
    return out[0] if n_split == 1 else out.sum(0)


def sparse_mm(x: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor, *,
              BLOCK_T: int | None = None, BLOCK_R: int | None = None) -> torch.Tensor:
    """``y = x S^T`` (``reference.sparse_mm``): ``[T, d_out]`` in ``x``'s dtype, fp32 sums."""
    d_out, k = check_pattern(idx, vals)
    _check_tokens("x", x, None, "d_in")
    _check_dtype("vals", vals)
    dev = _same_device(x, idx, vals)
    T = int(x.shape[0])
    if T == 0 or d_out == 0 or k == 0:
        return torch.zeros((T, d_out), dtype=x.dtype, device=dev)
    kern = _kernels(dev)["sparse_mm_kernel"]
    bt, br = BLOCK_T or SPARSE_MM_BLOCKS["BLOCK_T"], BLOCK_R or SPARSE_MM_BLOCKS["BLOCK_R"]
    y = torch.empty((T, d_out), dtype=x.dtype, device=dev)
    kern[(_cdiv(d_out, br), _cdiv(T, bt))](
        x, idx, vals, y, T, d_out, k,
        x.stride(0), x.stride(1), idx.stride(0), idx.stride(1), vals.stride(0), vals.stride(1),
        y.stride(0), y.stride(1),
        BLOCK_T=bt, BLOCK_R=br, **_LAUNCH["sparse_mm_kernel"],
    )
    return y


class ColumnPlan(NamedTuple):
    """A CSC transpose of an index, what ``sparse_mm_t`` walks instead of scattering with atomics.

    ``entry[colptr[c]:colptr[c + 1]]`` are the row-major positions ``e = i * k + j`` of the
    entries with ``idx[i, j] == c``, rows ascending; ``blockmax[b]`` is the largest entry count of
    the columns ``[b * block_c, (b + 1) * block_c)``. All int32, on the index's device.
    """

    colptr: torch.Tensor
    entry: torch.Tensor
    blockmax: torch.Tensor
    d_out: int
    k: int
    d_in: int
    block_c: int


def column_plan(idx: torch.Tensor, d_in: int, block_c: int = COLUMN_BLOCK) -> ColumnPlan:
    """Build the ``ColumnPlan`` of ``idx`` ``[d_out, k]`` for inputs of width ``d_in`` (pure torch, once per index).

    Example: ``idx = [[0, 2], [1, 2]]``, ``d_in = 3`` gives ``colptr = [0, 1, 2, 4]`` and
    ``entry = [0, 2, 1, 3]`` (column 2 holds entries 1 and 3: row 0 slot 1, row 1 slot 1).
    Raises ``ValueError`` if a column is outside ``[0, d_in)``.
    """
    d_out, k = check_pattern(idx)
    nnz = d_out * k
    if nnz >= 2**31 or d_in >= 2**31:
        raise ValueError(f"index too large for the int32 column plan ({d_out} x {k}, d_in {d_in})")
    flat = idx.reshape(-1).long()
    if nnz and (int(flat.min()) < 0 or int(flat.max()) >= d_in):
        raise ValueError(f"idx has columns outside [0, {d_in}): min {int(flat.min())}, max {int(flat.max())}")
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=d_in)
    colptr = torch.zeros(d_in + 1, dtype=torch.int64, device=idx.device)
    torch.cumsum(counts, 0, out=colptr[1:])
    n_blocks = _cdiv(d_in, block_c)
    padded = torch.zeros(n_blocks * block_c, dtype=counts.dtype, device=idx.device)
    padded[:d_in] = counts
    blockmax = padded.view(n_blocks, block_c).amax(1) if n_blocks else padded[:0]
    return ColumnPlan(colptr.to(torch.int32), order.to(torch.int32), blockmax.to(torch.int32),
                      d_out, k, int(d_in), int(block_c))


def sparse_mm_t(g: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor, d_in: int,
                plan: ColumnPlan | None = None, *, BLOCK_T: int | None = None) -> torch.Tensor:
    """``gx = g S`` (``reference.sparse_mm_t``): ``[T, d_in]`` in ``g``'s dtype, fp32 sums, no atomics.

    ``plan`` is ``column_plan(idx, d_in)``; pass it when calling repeatedly with one index (it is
    built here otherwise, an argsort per call). ``vals`` may change between calls, the plan not.
    """
    d_out, k = check_pattern(idx, vals)
    _check_tokens("g", g, d_out, "d_out")
    _check_dtype("vals", vals)
    dev = _same_device(g, idx, vals)
    if plan is None:
        plan = column_plan(idx, d_in)
    elif (plan.d_out, plan.k, plan.d_in) != (d_out, k, d_in) or plan.colptr.device != dev:
        raise ValueError(f"column plan for {plan.d_out}x{plan.k} (d_in {plan.d_in}, {plan.colptr.device}) "
                         f"does not fit idx {d_out}x{k} (d_in {d_in}, {dev})")
    T = int(g.shape[0])
    if T == 0 or d_in == 0 or d_out * k == 0:
        return torch.zeros((T, d_in), dtype=g.dtype, device=dev)
    kern = _kernels(dev)["sparse_mm_t_kernel"]
    bt = BLOCK_T or SPARSE_MM_T_BLOCKS["BLOCK_T"]
    gx = torch.empty((T, d_in), dtype=g.dtype, device=dev)
    kern[(_cdiv(d_in, plan.block_c), _cdiv(T, bt))](
        g, vals, plan.colptr, plan.entry, plan.blockmax, gx, T, d_in, k,
        g.stride(0), g.stride(1), vals.stride(0), vals.stride(1), gx.stride(0), gx.stride(1),
        BLOCK_T=bt, BLOCK_C=plan.block_c, **_LAUNCH["sparse_mm_t_kernel"],
    )
    return gx
