"""SDDMM, the delta gradient of the bypass: ``out[i, j] = sum_t g[t, i] * x[t, idx[i, j]]``.

Backends (``NEUROADA_KERNELS``, ``kernels/backend.py``): the Triton kernel
(``kernels/triton_kernels.py``; CUDA, or CPU under ``TRITON_INTERPRET=1``), the compiled CPU kernel
(``csrc/sddmm.c``), and the pure torch path: ``torch.sparse.sampled_addmm`` or a per-column gather.
``kernels/ops.py`` registers ``sddmm`` as the torch op ``neuroada::sddmm``; ``kernels/reference.py``
holds the definition every backend is tested against."""

from __future__ import annotations

import threading
import warnings

import torch

from neuroada_tools.kernels import backend as backends
from neuroada_tools.kernels import native, triton_kernels

# SDDMM kernel: "auto" (on CPU with fp32/bf16 inputs the compiled kernel when it is available;
# otherwise "columns" for k <= _COLUMNS_MAX_K or where sampled_addmm raised, else "sampled_addmm"),
# or force "native" / "sampled_addmm" / "columns" (tests and benchmarks do)
SDDMM_BACKEND = "auto"
NATIVE_DTYPES = (torch.float32, torch.bfloat16)  # what the compiled SDDMM and refresh take
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


def sddmm(g: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, crow: torch.Tensor | None = None) -> torch.Tensor:
    """``out[i, j] = sum_t g[t, i] * x[t, idx[i, j]]`` in fp32, without forming ``g^T x``.

    ``g`` is ``[T, d_out]``, ``x`` is ``[T, d_in]`` (any float dtype), ``idx`` int ``[d_out, k]``
    with rows strictly ascending; ``crow`` (``arange(d_out + 1) * k``, same dtype as ``idx``) may be
    passed to avoid rebuilding it. Returns fp32 ``[d_out, k]``.

    Example: ``g = [[1, 2]]``, ``x = [[3, 4, 5]]``, ``idx = [[2], [0]]`` gives ``[[1 * 5], [2 * 3]]
    = [[5], [6]]``.

    ``NEUROADA_KERNELS`` first (``kernels/backend.py``): ``triton`` runs the Triton kernel; ``torch``
    only the last two below. Then three kernels (``SDDMM_BACKEND``; ``"auto"`` picks):

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
    chosen = backends.choose(g.device)  # NEUROADA_KERNELS; an explicit "triton" never falls back
    if chosen == "triton" and T > 0:
        return triton_kernels.sddmm(g, x, idx)
    backend = SDDMM_BACKEND if chosen == "native" or SDDMM_BACKEND != "auto" else "torch-auto"
    if backend in ("auto", "native") and device_type == "cpu" and g.dtype == x.dtype and x.dtype in NATIVE_DTYPES:
        lib = native.kernel()
        if lib is not None and T > 0:
            return _sddmm_native(lib, g, x, idx)
    if backend == "native":
        raise RuntimeError("SDDMM_BACKEND='native' but the kernel is unavailable for these inputs")
    if backend in ("auto", "torch-auto"):
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

