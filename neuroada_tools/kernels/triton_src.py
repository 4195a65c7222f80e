"""The Triton kernel bodies behind ``triton_kernels.py`` (imports triton: load it only through that module).

The functions here are left undecorated: ``triton_kernels._kernels()`` wraps them with ``triton.jit``
on first use, once per mode, so that ``TRITON_INTERPRET=1`` set after this module was imported still
takes effect (``triton.jit`` reads the setting when it decorates).

Shared rules:
- ``g`` and ``x`` are read in their own dtype (bf16, fp16, fp32) through their strides: no upcast
  copy, no transpose. Products and sums are fp32 in registers.
- The index layout is the bypass's: ``idx[i, j]``, ``j < k``, the ``k`` columns of row ``i``;
  ``vals[i, j]`` (fp32) beside it. Both are read through their strides.
- Every load and store is masked at the edges, so T, d_out, d_in and k need not be multiples of
  any block. Token offsets are computed in int64 (``T * stride`` can pass 2**31).
- Grid axis 0 is the fastest-varying one; the kernels put the non-token axis there, so the
  programs running at the same time work on the same tokens and the token tile they gather from
  (``x`` or ``g``, a few hundred KB) stays in L2 while they share it.
- The lanes of a warp hold neighbouring rows (or columns, in ``sparse_mm_t``) at one slot. Each
  row's columns ascend, so the ``j``-th columns of neighbouring rows lie in a narrow window: a
  warp's gather touches a few cache lines, not one per lane.
- Only builtins of ``triton.language`` (``tl.full``, not ``tl.zeros``; no ``tl.sum``): those that
  triton implements as ``@triton.jit`` functions are jitted when triton is imported, so they break
  the interpreter in a process that imported triton before ``TRITON_INTERPRET=1`` was set (importing
  transformers imports torch._dynamo, which imports triton). With builtins only, the mode is
  decided when these kernels are jitted, on first launch.

The annotations are real ``tl.constexpr`` objects (no ``from __future__ import annotations``): the
block sizes must be compile-time constants.
"""

import triton.language as tl


def sddmm_kernel(
    g_ptr, x_ptr, idx_ptr, out_ptr,
    d_out, t_per_split, T,
    stride_gt, stride_gi, stride_xt, stride_xc, stride_ir, stride_ij, stride_os, stride_or,
    BLOCK_R: tl.constexpr, UNROLL: tl.constexpr,
):
    """``out[s, i, j] = sum_{t in split s} g[t, i] * x[t, idx[i, j]]`` for a block of rows, one slot ``j``.

    Grid: axis 0 the blocks of ``BLOCK_R`` rows, axis 1 the slot ``j < k``, axis 2 the token split
    (one split unless the wrapper splits T for parallelism, and then it sums the partials). One
    program owns the entries ``(i, j)`` of its rows at its slot, one per lane, and walks its tokens
    in order, ``UNROLL`` at a time (unrolled, so that many loads are in flight per thread; then the
    remainder one by one): per token it loads ``g[t, rows]`` (contiguous) and gathers
    ``x[t, idx[rows, j]]``, and adds their product to an fp32 accumulator. No reduction across
    threads: each entry is summed by one thread in token order.

    Why slots on the grid, rows on the lanes: the ``j``-th selected column of neighbouring rows
    lies in a narrow window of ``x``'s row (columns are ascending in each row), so a warp's
    gather touches a few cache lines, where the ``k`` slots of one row would span the whole row.
    The programs resident at one time sweep the tokens at about the same pace, so the rows of
    ``x`` and ``g`` they read are shared in L1/L2 rather than fetched once per selected entry.
    """
    pid_r = tl.program_id(0)
    j = tl.program_id(1)
    pid_s = tl.program_id(2)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < d_out
    col = tl.load(idx_ptr + r * stride_ir + j * stride_ij, mask=rmask, other=0)
    t_start = pid_s * t_per_split
    n_t = tl.minimum(T - t_start, t_per_split)
    t0_64 = t_start.to(tl.int64)
    g_p = g_ptr + t0_64 * stride_gt + r.to(tl.int64) * stride_gi
    x_p = x_ptr + t0_64 * stride_xt + col.to(tl.int64) * stride_xc
    acc = tl.full([BLOCK_R], 0.0, tl.float32)
    n_unrolled = (n_t // UNROLL) * UNROLL
    for _t0 in range(0, n_unrolled, UNROLL):
        for _u in tl.static_range(UNROLL):
            gv = tl.load(g_p, mask=rmask, other=0.0)
            xv = tl.load(x_p, mask=rmask, other=0.0)
            acc += gv.to(tl.float32) * xv.to(tl.float32)
            g_p += stride_gt
            x_p += stride_xt
    for _t in range(n_unrolled, n_t):  # the last n_t % UNROLL tokens
        gv = tl.load(g_p, mask=rmask, other=0.0)
        xv = tl.load(x_p, mask=rmask, other=0.0)
        acc += gv.to(tl.float32) * xv.to(tl.float32)
        g_p += stride_gt
        x_p += stride_xt
    tl.store(out_ptr + pid_s * stride_os + r * stride_or + j, acc, mask=rmask)


def sparse_mm_kernel(
    x_ptr, idx_ptr, vals_ptr, y_ptr,
    T, d_out, k,
    stride_xt, stride_xc, stride_ir, stride_ij, stride_vr, stride_vj, stride_yt, stride_yi,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``y[t, i] = sum_j x[t, idx[i, j]] * vals[i, j]`` for a ``[BLOCK_T, BLOCK_R]`` tile of ``y``.

    Axis 0 walks the row blocks, axis 1 the token blocks. The program loops over the ``k`` selected
    columns: for each ``j`` it loads ``idx[rows, j]`` and ``vals[rows, j]`` (``BLOCK_R`` each) and
    gathers ``x[tokens, idx[rows, j]]``, a ``[BLOCK_T, BLOCK_R]`` tile, into an fp32 accumulator.
    The tile is stored once, rounded to ``y``'s dtype. Each token's row of ``x`` is gathered
    ``d_out * k`` times in all, by the programs of all row blocks, from L1/L2.
    """
    pid_r = tl.program_id(0)
    pid_t = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = r < d_out
    m = (t < T)[:, None] & rmask[None, :]
    t64 = t.to(tl.int64)
    x_rows = x_ptr + (t64 * stride_xt)[:, None]
    acc = tl.full([BLOCK_T, BLOCK_R], 0.0, tl.float32)
    for j in range(0, k):
        col = tl.load(idx_ptr + r * stride_ir + j * stride_ij, mask=rmask, other=0)
        v = tl.load(vals_ptr + r * stride_vr + j * stride_vj, mask=rmask, other=0.0).to(tl.float32)
        xv = tl.load(x_rows + (col.to(tl.int64) * stride_xc)[None, :], mask=m, other=0.0)
        acc += xv.to(tl.float32) * v[None, :]
    y = y_ptr + (t64 * stride_yt)[:, None] + (r.to(tl.int64) * stride_yi)[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m)


def sparse_mm_t_kernel(
    g_ptr, vals_ptr, colptr_ptr, entry_ptr, blockmax_ptr, gx_ptr,
    T, d_in, k,
    stride_gt, stride_gi, stride_vr, stride_vj, stride_xt, stride_xc,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``gx[t, c] = sum over entries e of column c: g[t, row(e)] * vals.flat[e]``, no atomics.

    The entries are read in column order through a CSC transpose of ``idx`` built once per index
    (``triton_kernels.column_plan``): ``entry[colptr[c]:colptr[c + 1]]`` are the row-major positions
    ``e = i * k + j`` of the entries in column ``c``, rows ascending. One program owns a
    ``[BLOCK_T, BLOCK_C]`` tile of ``gx`` (axis 0: column blocks, axis 1: token blocks) and loops
    ``blockmax[block]`` times, the most entries any of its columns has; step ``m`` takes entry ``m``
    of every column (masked where a column has fewer), gathers ``g[tokens, row]`` and adds
    ``g * vals`` into an fp32 accumulator. Each column is summed by one program in a fixed order,
    so the result is deterministic. A column that no row selects stores zeros.

    The lanes of a warp hold neighbouring columns, whose ``m``-th entries sit in neighbouring rows
    (rows ascend within a column), so the gathers from ``g`` touch a few cache lines per token.
    Cost follows the longest column of a block: a column that most rows select (an outlier input
    feature) makes its block loop ``d_out`` times while the others finish early. That costs time,
    never correctness; sorting the columns by count would even it out, at the price of scattered
    stores.
    """
    pid_c = tl.program_id(0)
    pid_t = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cmask = c < d_in
    tmask = t < T
    start = tl.load(colptr_ptr + c, mask=cmask, other=0)
    count = tl.load(colptr_ptr + c + 1, mask=cmask, other=0) - start
    n = tl.load(blockmax_ptr + pid_c)
    t64 = t.to(tl.int64)
    g_rows = g_ptr + (t64 * stride_gt)[:, None]
    acc = tl.full([BLOCK_T, BLOCK_C], 0.0, tl.float32)
    for m in range(0, n):
        live = m < count
        e = tl.load(entry_ptr + start + m, mask=live, other=0)
        row = e // k
        j = e - row * k
        v = tl.load(vals_ptr + row * stride_vr + j * stride_vj, mask=live, other=0.0).to(tl.float32)
        gv = tl.load(g_rows + (row.to(tl.int64) * stride_gi)[None, :], mask=tmask[:, None] & live[None, :], other=0.0)
        acc += gv.to(tl.float32) * v[None, :]
    out = gx_ptr + (t64 * stride_xt)[:, None] + (c.to(tl.int64) * stride_xc)[None, :]
    tl.store(out, acc.to(gx_ptr.dtype.element_ty), mask=tmask[:, None] & cmask[None, :])
