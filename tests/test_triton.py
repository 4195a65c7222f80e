"""Triton kernels (``kernels/triton_kernels.py``) against the torch reference (``kernels/reference.py``).

The kernels run in Triton's interpreter on CPU tensors: a module fixture sets ``TRITON_INTERPRET=1``
before anything here imports triton (``triton_kernels`` imports it on first launch, and jits the
kernels per mode, reading the setting then), and restores it afterwards. Shapes are awkward on
purpose: k = 1, 3, 20; T = 1, 17, 300; d_out and d_in prime, so no block size divides them;
bf16, fp16, fp32; strided views. The interpreter is slow, so sizes stay small.

Where triton is not installed the kernel tests skip, except under ``NEUROADA_NATIVE=1`` (CI,
``scripts/test.sh``), where a missing triton fails ``test_triton_installed_in_ci`` and the kernel
tests themselves. Also here: the reference's own contract (against dense ``S``), the package
importing without triton, the kernels compiling ahead of time for sm_90 (no GPU needed), and
``SparseLinearAdd`` (gradcheck on the torch backend, the triton backend against it).
"""

from __future__ import annotations

import doctest
import os
import subprocess
import sys

import pytest
import torch

from neuroada_tools.kernels import reference, sparse_add, triton_kernels
from neuroada_tools.kernels.sparse_add import SparseLinearAdd, sparse_linear_add
from neuroada_tools.kernels.triton_kernels import TritonUnavailable, column_plan

CI = os.environ.get("NEUROADA_NATIVE") == "1"
needs_triton = pytest.mark.skipif(
    not triton_kernels.available() and not CI,
    reason="triton is not installed (pip install triton; scripts/setup.sh does); CI requires it",
)

# Outputs in the token dtype are one rounding of an fp32 sum; kernel and reference sum in different
# orders, so they may differ by one unit in the last place of that dtype (2**-7 for bf16,
# 2**-10 for fp16, relative). fp32 outputs (sddmm always) differ by fp32 summation error only.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-4),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=1e-5),
}
FP32_SUMS = dict(rtol=1e-5, atol=2e-4)
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (T, d_out, d_in, k): every T and k the issue names; d_out, d_in prime. The interpreter runs
# SDDMM's token loop in Python once per (row block, slot), so T = 300 goes with k = 3 in the full
# cross product and with k = 20 for bf16 only (the slowest dtype in the interpreter, the one GPUs run).
SHAPES = [(1, 37, 53, 1), (17, 41, 67, 20), (300, 43, 71, 3)]
CASES = [
    pytest.param(*shape, dtype, id="-".join(map(str, (*shape, str(dtype)[6:]))))
    for shape in [*SHAPES, (300, 43, 71, 20)] for dtype in DTYPES
    if shape[0] * shape[3] < 6000 or dtype == torch.bfloat16
]


@pytest.fixture(scope="module", autouse=True)
def _interpret():
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old


def _idx(d_out: int, d_in: int, k: int, seed: int = 0, dtype=torch.int64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(d_in, generator=gen)[:k].sort().values for _ in range(d_out)]
    return torch.stack(rows).to(dtype)


def _randn(*shape: int, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _dense(idx: torch.Tensor, vals: torch.Tensor, d_in: int) -> torch.Tensor:
    return torch.zeros(idx.shape[0], d_in, dtype=vals.dtype).scatter(1, idx.long(), vals)


# ---- the reference: the contract itself -------------------------------------------------------


def test_reference_docstring_examples():
    for mod in (reference, sparse_add):
        result = doctest.testmod(mod, extraglobs={"torch": torch})
        assert result.failed == 0 and result.attempted > 0, mod.__name__


@pytest.mark.parametrize("T,d_out,d_in,k", SHAPES)
def test_reference_matches_dense_formulas(T, d_out, d_in, k):
    idx = _idx(d_out, d_in, k)
    x, g = _randn(T, d_in, dtype=torch.float64), _randn(T, d_out, dtype=torch.float64, seed=2)
    vals = _randn(d_out, k, dtype=torch.float64, seed=3)
    S = _dense(idx, vals, d_in)
    torch.testing.assert_close(reference.sparse_mm(x, idx, vals), x @ S.t())
    torch.testing.assert_close(reference.sparse_mm_t(g, idx, vals, d_in), g @ S)
    torch.testing.assert_close(reference.sddmm(g, x, idx), (g.t() @ x).gather(1, idx))


def test_reference_accumulates_in_fp32_and_returns_the_token_dtype():
    idx = _idx(5, 9, 2)
    x, g, vals = _randn(4, 9, dtype=torch.bfloat16), _randn(4, 5, dtype=torch.bfloat16), _randn(5, 2)
    assert reference.sddmm(g, x, idx).dtype == torch.float32
    assert reference.sparse_mm(x, idx, vals).dtype == torch.bfloat16
    assert reference.sparse_mm_t(g, idx, vals, 9).dtype == torch.bfloat16


def test_reference_rejects_bad_shapes():
    idx = _idx(5, 9, 2)
    with pytest.raises(ValueError, match="2-D"):
        reference.sparse_mm(torch.zeros(2, 3, 9), idx, torch.zeros(5, 2))
    with pytest.raises(ValueError, match="vals shape"):
        reference.sparse_mm(torch.zeros(3, 9), idx, torch.zeros(5, 3))
    with pytest.raises(ValueError, match="expected d_out = 5"):
        reference.sddmm(torch.zeros(3, 4), torch.zeros(3, 9), idx)
    with pytest.raises(TypeError, match="int32 or int64"):
        reference.sparse_mm(torch.zeros(3, 9), idx.float(), torch.zeros(5, 2))


# ---- installation -----------------------------------------------------------------------------


def test_triton_installed_in_ci():
    """CI (NEUROADA_NATIVE=1) must run the kernel tests, not skip them."""
    if not CI:
        pytest.skip("only required under NEUROADA_NATIVE=1 (scripts/test.sh, CI)")
    assert triton_kernels.available(), "triton is not importable; scripts/setup.sh installs it"
    import triton  # noqa: F401


def test_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, neuroada_tools\n"
        "import neuroada_tools.kernels.triton_kernels as tk, neuroada_tools.kernels.sparse_add as sa\n"
        "assert not tk.available()\n"
        "x, idx, d = torch.ones(2, 4), torch.tensor([[0, 1], [2, 3]]), torch.ones(2, 2)\n"
        "assert sa.sparse_linear_add(x, idx, d).tolist() == [[2.0, 2.0], [2.0, 2.0]]\n"
        "try:\n    sa.sparse_linear_add(x, idx, d, backend='triton')\n"
        "except tk.TritonUnavailable as e:\n    print('refused:', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: the Triton kernels need the 'triton' package" in out.stdout


# ---- the kernels against the reference --------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("T,d_out,d_in,k,dtype", CASES)
def test_sddmm_matches_reference(T, d_out, d_in, k, dtype):
    idx = _idx(d_out, d_in, k)
    g, x = _randn(T, d_out, dtype=dtype), _randn(T, d_in, dtype=dtype, seed=2)
    out = triton_kernels.sddmm(g, x, idx)
    assert out.dtype == torch.float32 and out.shape == (d_out, k)
    torch.testing.assert_close(out, reference.sddmm(g, x, idx), **FP32_SUMS)


@needs_triton
@pytest.mark.parametrize("T,d_out,d_in,k,dtype", CASES)
def test_sparse_mm_matches_reference(T, d_out, d_in, k, dtype):
    idx, vals = _idx(d_out, d_in, k), _randn(d_out, k, seed=3)
    x = _randn(T, d_in, dtype=dtype, seed=2)
    y = triton_kernels.sparse_mm(x, idx, vals)
    assert y.dtype == dtype and y.shape == (T, d_out)
    torch.testing.assert_close(y, reference.sparse_mm(x, idx, vals), **TOL[dtype])


@needs_triton
@pytest.mark.parametrize("T,d_out,d_in,k,dtype", CASES)
def test_sparse_mm_t_matches_reference(T, d_out, d_in, k, dtype):
    idx, vals = _idx(d_out, d_in, k), _randn(d_out, k, seed=3)
    g = _randn(T, d_out, dtype=dtype)
    gx = triton_kernels.sparse_mm_t(g, idx, vals, d_in)
    assert gx.dtype == dtype and gx.shape == (T, d_in)
    torch.testing.assert_close(gx, reference.sparse_mm_t(g, idx, vals, d_in), **TOL[dtype])


def _strided(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as ``t`` (2-D), as a non-contiguous view."""
    if how == "transposed":  # column-major: stride (1, rows)
        view = t.t().contiguous().t()
    else:  # every other column of a wider tensor, from an offset into its storage
        wide = torch.zeros(t.shape[0] + 1, 2 * t.shape[1] + 3, dtype=t.dtype)
        wide[1:, 3::2] = t
        view = wide[1:, 3::2]
    assert not view.is_contiguous() and torch.equal(view, t)
    return view


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("how", ["transposed", "sliced"])
def test_kernels_take_strided_inputs(dtype, how):
    T, d_out, d_in, k = 19, 23, 47, 5
    idx = _idx(d_out, d_in, k, dtype=torch.int32)
    vals = _randn(d_out, k, seed=3)
    g, x = _randn(T, d_out, dtype=dtype), _randn(T, d_in, dtype=dtype, seed=2)
    sg, sx, sidx, svals = (_strided(t, how) for t in (g, x, idx, vals))
    torch.testing.assert_close(triton_kernels.sddmm(sg, sx, sidx), reference.sddmm(g, x, idx), **FP32_SUMS)
    torch.testing.assert_close(triton_kernels.sparse_mm(sx, sidx, svals), reference.sparse_mm(x, idx, vals),
                               **TOL[dtype])
    torch.testing.assert_close(triton_kernels.sparse_mm_t(sg, sidx, svals, d_in),
                               reference.sparse_mm_t(g, idx, vals, d_in), **TOL[dtype])


@needs_triton
def test_small_blocks_cover_edges():
    """Blocks much smaller than the shapes: many programs per axis, a ragged last block on every
    axis, an sddmm token count that is not a multiple of its unrolling."""
    T, d_out, d_in, k = 37, 29, 61, 20
    idx, vals = _idx(d_out, d_in, k), _randn(d_out, k, seed=3)
    g, x = _randn(T, d_out), _randn(T, d_in, seed=2)
    torch.testing.assert_close(triton_kernels.sddmm(g, x, idx, BLOCK_R=8, UNROLL=4),
                               reference.sddmm(g, x, idx), **FP32_SUMS)
    torch.testing.assert_close(triton_kernels.sparse_mm(x, idx, vals, BLOCK_T=16, BLOCK_R=8),
                               reference.sparse_mm(x, idx, vals), **FP32_SUMS)
    plan = column_plan(idx, d_in, block_c=8)
    torch.testing.assert_close(triton_kernels.sparse_mm_t(g, idx, vals, d_in, plan, BLOCK_T=16),
                               reference.sparse_mm_t(g, idx, vals, d_in), **FP32_SUMS)


@needs_triton
@pytest.mark.parametrize("T,splits", [(300, 2), (300, 3), (23, 1000)])
def test_sddmm_token_splits(T, splits):
    d_out, d_in, k = 13, 31, 3
    idx = _idx(d_out, d_in, k)
    g, x = _randn(T, d_out, dtype=torch.bfloat16), _randn(T, d_in, dtype=torch.bfloat16, seed=2)
    out = triton_kernels.sddmm(g, x, idx, splits=splits)
    torch.testing.assert_close(out, reference.sddmm(g, x, idx), **FP32_SUMS)
    assert torch.equal(out, triton_kernels.sddmm(g, x, idx, splits=splits)), "not deterministic"


@needs_triton
def test_sparse_mm_t_skewed_and_empty_columns():
    """Every row selects column 0 (one long column), columns past 40 are never selected (zeros)."""
    T, d_out, d_in, k = 21, 50, 97, 3
    tail = _idx(d_out, 40, k - 1)
    idx = torch.cat([torch.zeros(d_out, 1, dtype=torch.int64), tail + 1], 1)
    vals, g = _randn(d_out, k, seed=3), _randn(T, d_out)
    plan = column_plan(idx, d_in)
    assert int(plan.blockmax[0]) == d_out and int(plan.blockmax[-1]) == 0
    gx = triton_kernels.sparse_mm_t(g, idx, vals, d_in, plan)
    torch.testing.assert_close(gx, reference.sparse_mm_t(g, idx, vals, d_in), **FP32_SUMS)
    assert torch.equal(gx[:, 41:], torch.zeros(T, d_in - 41))
    assert torch.equal(gx, triton_kernels.sparse_mm_t(g, idx, vals, d_in, plan)), "not deterministic"


def test_column_plan_example():
    plan = column_plan(torch.tensor([[0, 2], [1, 2]]), 3, block_c=2)
    assert plan.colptr.tolist() == [0, 1, 2, 4]
    assert plan.entry.tolist() == [0, 2, 1, 3]
    assert plan.blockmax.tolist() == [1, 2]
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        column_plan(torch.tensor([[0, 2], [1, 2]]), 2)


@needs_triton
def test_empty_inputs():
    idx, vals = _idx(7, 11, 2), _randn(7, 2)
    assert torch.equal(triton_kernels.sddmm(torch.zeros(0, 7), torch.zeros(0, 11), idx), torch.zeros(7, 2))
    assert triton_kernels.sparse_mm(torch.zeros(0, 11), idx, vals).shape == (0, 7)
    assert triton_kernels.sparse_mm_t(torch.zeros(0, 7), idx, vals, 11).shape == (0, 11)


@needs_triton
def test_refusals_never_fall_back(monkeypatch):
    idx, vals, x = _idx(7, 11, 2), _randn(7, 2), _randn(3, 11)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(TritonUnavailable, match="TRITON_INTERPRET=1 is not set"):
        triton_kernels.sparse_mm(x, idx, vals)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(TypeError, match="float64"):
        triton_kernels.sparse_mm(x.double(), idx, vals)
    with pytest.raises(ValueError, match="does not fit"):
        triton_kernels.sparse_mm_t(_randn(3, 7), idx, vals, 11, column_plan(idx, 12))
    triton_kernels.sparse_mm(x, idx, vals)
    from triton.runtime.interpreter import InterpretedFunction

    assert all(isinstance(f, InterpretedFunction) for f in triton_kernels._jitted[True].values())


# ---- the compiled path: ahead-of-time for sm_90, no GPU needed --------------------------------

_POINTERS = {
    "sddmm_kernel": {"g_ptr": "TOKEN", "x_ptr": "TOKEN", "idx_ptr": "*i64", "out_ptr": "*fp32"},
    "sparse_mm_kernel": {"x_ptr": "TOKEN", "idx_ptr": "*i64", "vals_ptr": "*fp32", "y_ptr": "TOKEN"},
    "sparse_mm_t_kernel": {"g_ptr": "TOKEN", "vals_ptr": "*fp32", "colptr_ptr": "*i32", "entry_ptr": "*i32",
                           "blockmax_ptr": "*i32", "gx_ptr": "TOKEN"},
}
_CONSTEXPRS = {
    "sddmm_kernel": triton_kernels.SDDMM_BLOCKS,
    "sparse_mm_kernel": triton_kernels.SPARSE_MM_BLOCKS,
    "sparse_mm_t_kernel": {**triton_kernels.SPARSE_MM_T_BLOCKS, "BLOCK_C": triton_kernels.COLUMN_BLOCK},
}


@needs_triton
@pytest.mark.parametrize("token", ["*bf16", "*fp32"])
@pytest.mark.parametrize("name", sorted(_POINTERS))
def test_kernels_compile_for_sm90(name, token):
    """The interpreter accepts code the compiler rejects (and the reverse): compile each kernel as
    a launch on an H100/H200 would, down to a cubin through the ptxas triton ships."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from neuroada_tools.kernels import triton_src

    fn = JITFunction(getattr(triton_src, name))
    consts = _CONSTEXPRS[name]
    types = {a: token if t == "TOKEN" else t for a, t in _POINTERS[name].items()}
    sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
    try:
        compiled = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                                  options=dict(triton_kernels._LAUNCH[name]))
    except RuntimeError as e:  # no nvidia backend in this triton build
        if "ptxas" in str(e) or "backend" in str(e):
            pytest.skip(f"cannot compile for sm_90 here: {e}")
        raise
    assert compiled.asm["cubin"]



@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the interpreter tests cover CPU)")
@pytest.mark.parametrize("T,d_out,d_in,k,dtype", CASES)
def test_kernels_compiled_on_cuda(T, d_out, d_in, k, dtype, monkeypatch):
    """On a GPU machine: the compiled kernels, same shapes and tolerances as the interpreter tests."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    dev = torch.device("cuda")
    idx, vals = _idx(d_out, d_in, k).to(dev), _randn(d_out, k, seed=3).to(dev)
    g, x = _randn(T, d_out, dtype=dtype).to(dev), _randn(T, d_in, dtype=dtype, seed=2).to(dev)
    torch.testing.assert_close(triton_kernels.sddmm(g, x, idx), reference.sddmm(g, x, idx), **FP32_SUMS)
    torch.testing.assert_close(triton_kernels.sddmm(g, x, idx, splits=3), reference.sddmm(g, x, idx), **FP32_SUMS)
    torch.testing.assert_close(triton_kernels.sparse_mm(x, idx, vals), reference.sparse_mm(x, idx, vals), **TOL[dtype])
    torch.testing.assert_close(triton_kernels.sparse_mm_t(g, idx, vals, d_in),
                               reference.sparse_mm_t(g, idx, vals, d_in), **TOL[dtype])
    assert not any(type(f).__name__ == "InterpretedFunction" for f in triton_kernels._jitted[False].values())

# ---- SparseLinearAdd: the sharding-safe bypass term ---------------------------------------------


def test_sparse_linear_add_gradcheck_torch_backend():
    idx = _idx(5, 7, 3)
    x = _randn(2, 3, 7, dtype=torch.float64).requires_grad_()
    delta = _randn(5, 3, dtype=torch.float64, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, d: SparseLinearAdd.apply(a, d, idx, "torch"), (x, delta))


def test_sparse_linear_add_is_x_times_dense_s():
    idx = _idx(5, 7, 3)
    x = _randn(2, 3, 7, dtype=torch.float64)
    delta = _randn(5, 3, dtype=torch.float64, seed=3)
    torch.testing.assert_close(sparse_linear_add(x, idx, delta), x @ _dense(idx, delta, 7).t())


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_linear_add_triton_matches_torch(dtype):
    d_out, d_in, k = 19, 37, 4
    idx = _idx(d_out, d_in, k)
    x0, delta0 = _randn(2, 9, d_in, dtype=dtype), _randn(d_out, k, seed=3)
    g = _randn(2, 9, d_out, dtype=dtype, seed=4)
    results = {}
    for backend, plan in (("torch", None), ("triton", column_plan(idx, d_in)), ("triton", None)):
        x, delta = x0.clone().requires_grad_(), delta0.clone().requires_grad_()
        y = sparse_linear_add(x, idx, delta, backend, plan)
        y.backward(g)
        results[backend, plan is None] = (y, x.grad, delta.grad)
    ref = results["torch", True]
    for key in (("triton", False), ("triton", True)):
        y, gx, gd = results[key]
        assert y.dtype == dtype and gx.dtype == dtype and gd.dtype == torch.float32
        torch.testing.assert_close(y, ref[0], **TOL[dtype])
        torch.testing.assert_close(gx, ref[1], **TOL[dtype])
        torch.testing.assert_close(gd, ref[2], **FP32_SUMS)


@needs_triton
def test_sparse_linear_add_grad_of_one_input_only():
    idx, delta = _idx(6, 10, 2), _randn(6, 2, seed=3)
    x = _randn(4, 10)
    d = delta.clone().requires_grad_()
    sparse_linear_add(x, idx, d, "triton").sum().backward()
    torch.testing.assert_close(d.grad, reference.sddmm(torch.ones(4, 6), x, idx), **FP32_SUMS)
    xg = x.clone().requires_grad_()
    sparse_linear_add(xg, idx, delta, "triton").sum().backward()
    torch.testing.assert_close(xg.grad, reference.sparse_mm_t(torch.ones(4, 6), idx, delta, 10), **FP32_SUMS)


def test_sparse_linear_add_unknown_backend():
    with pytest.raises(ValueError, match="unknown sparse bypass backend 'cuda'"):
        sparse_linear_add(torch.ones(2, 4), torch.tensor([[0, 1]]), torch.ones(1, 2), "cuda")
