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
    k, nnz, t_per_split, T,
    stride_gt, stride_gi, stride_xt, stride_xc, stride_ir, stride_ij, stride_os,
    BLOCK_N: tl.constexpr, UNROLL: tl.constexpr,
):
    """``out[s, e] = sum_{t in split s} g[t, row(e)] * x[t, idx.flat[e]]`` over a block of entries.

    The ``d_out * k`` selected entries are numbered row-major (``e = i * k + j``) and cut into blocks
    of ``BLOCK_N``; one program owns one block for one split of the tokens (axis 1; one split unless
    the wrapper splits T for parallelism, and then it sums the ``[splits, nnz]`` partials). Any k
    costs no padding: a block may start and end mid-row.

    The program walks its tokens in order, ``UNROLL`` at a time (unrolled, so that many gathers are
    in flight per thread; then the remainder one by one): for each token it gathers ``g[t, row(e)]`` (the ``k`` entries of a row
    share one address) and ``x[t, col(e)]`` and adds their product to its fp32 accumulator. No
    reduction across threads: each entry is summed by one thread in token order. The programs
    resident at one time sweep the tokens at about the same pace, so the rows of ``x`` and ``g``
    they gather from are shared in L2.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    e = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    emask = e < nnz
    row = e // k
    j = e - row * k
    col = tl.load(idx_ptr + row * stride_ir + j * stride_ij, mask=emask, other=0)
    t_start = pid_s * t_per_split
    n_t = tl.minimum(T - t_start, t_per_split)
    t0_64 = t_start.to(tl.int64)
    g_p = g_ptr + t0_64 * stride_gt + row.to(tl.int64) * stride_gi
    x_p = x_ptr + t0_64 * stride_xt + col.to(tl.int64) * stride_xc
    acc = tl.full([BLOCK_N], 0.0, tl.float32)
    n_unrolled = (n_t // UNROLL) * UNROLL
    for _t0 in range(0, n_unrolled, UNROLL):
        for _u in tl.static_range(UNROLL):
            gv = tl.load(g_p, mask=emask, other=0.0)
            xv = tl.load(x_p, mask=emask, other=0.0)
            acc += gv.to(tl.float32) * xv.to(tl.float32)
            g_p += stride_gt
            x_p += stride_xt
    for _t in range(n_unrolled, n_t):  # the last n_t % UNROLL tokens
        gv = tl.load(g_p, mask=emask, other=0.0)
        xv = tl.load(x_p, mask=emask, other=0.0)
        acc += gv.to(tl.float32) * xv.to(tl.float32)
        g_p += stride_gt
        x_p += stride_xt
    tl.store(out_ptr + pid_s * stride_os + e, acc, mask=emask)


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
    The tile is stored once, rounded to ``y``'s dtype.
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
