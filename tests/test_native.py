"""native.py and the compiled kernels: same answers as the torch paths, clean fallback."""

from __future__ import annotations

import pytest
import torch

from neuroada_tools.errors import NeuroAdaError
from neuroada_tools.index.criteria import select
from neuroada_tools.kernels import native
from neuroada_tools.kernels import sddmm as sddmm_mod
from neuroada_tools.train.bypass import layer as bypass_layer


@pytest.fixture
def torch_only(monkeypatch):
    """Run the code under test with the kernel unavailable (the pure-torch paths)."""
    monkeypatch.setitem(native._state, "lib", None)


def _weights(kind: str, shape: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    d_out, d_in = shape
    if kind == "normal":
        return torch.randn(shape, generator=g) * 0.02
    if kind == "ties":
        return torch.randint(-3, 4, shape, generator=g).float()
    if kind == "special":  # NaN, +-inf, -0.0 among normal values
        w = torch.randn(shape, generator=g)
        m = torch.rand(shape, generator=g)
        w[m < 0.05] = float("nan")
        w[(m >= 0.05) & (m < 0.1)] = float("inf")
        w[(m >= 0.1) & (m < 0.15)] = -0.0
        w[(m >= 0.15) & (m < 0.2)] = -float("inf")
        return w
    if kind == "row_scales":  # rows 16 orders of magnitude apart: the learned threshold is wrong
        return torch.randn(shape, generator=g) * torch.logspace(-8, 8, d_out).unsqueeze(1)
    return torch.zeros(shape)


def test_kernel_is_built_where_a_compiler_exists():
    if native._compiler() is None:
        pytest.skip("no C compiler on this machine")
    assert native.kernel() is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["normal", "ties", "special", "row_scales", "zeros"])
def test_native_select_equals_torch_path(dtype, kind, monkeypatch):
    if native.kernel() is None:
        pytest.skip("kernel unavailable")
    g = torch.Generator().manual_seed(7)
    for shape in ((1, 1), (3, 7), (70, 300), (129, 1000)):
        w = _weights(kind, shape, g).to(dtype)
        for k in sorted({1, min(2, shape[1]), min(5, shape[1]), max(1, shape[1] // 2), shape[1]}):
            for criterion in ("magnitude", "smallest"):
                for logical in (w, w.t().contiguous().t()):  # row-major and Conv1D-style views
                    fast = select(logical, k, criterion)
                    with monkeypatch.context() as m:
                        m.setitem(native._state, "lib", None)
                        slow = select(logical, k, criterion)
                    assert torch.equal(fast, slow), (shape, k, criterion, logical.stride())


def test_build_failure_falls_back_or_raises(monkeypatch):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    monkeypatch.setenv("NEUROADA_NATIVE", "auto")
    assert native._load() is None
    monkeypatch.setenv("NEUROADA_NATIVE", "1")
    with pytest.raises(NeuroAdaError, match=r"building the native kernels failed: no C compiler found \(set CC\)"):
        native._load()
    monkeypatch.setenv("NEUROADA_NATIVE", "0")
    assert native._load() is None


def test_compiler_error_is_reported(monkeypatch, tmp_path):
    bad = tmp_path / "broken.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(native, "_SOURCES", [bad])
    monkeypatch.setenv("NEUROADA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("NEUROADA_NATIVE", "1")
    if native._compiler() is None:
        pytest.skip("no C compiler on this machine")
    with pytest.raises(NeuroAdaError, match="building the native kernels failed: .*broken.c"):
        native._load()
    assert list((tmp_path / "cache" / "native").iterdir()) == []  # no half-written library left


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "T,d_in,d_out,k",
    [
        (1, 3, 2, 1),
        (63, 17, 5, 3),
        (64, 33, 40, 33),
        (200, 70, 9, 1),
        (130, 16, 16, 16),
        (29, 27, 300, 5),
        (100, 43, 260, 9),
    ],
)  # 16 + 8 + rest tokens and columns; 256-row chunks
def test_native_sddmm_equals_dense_gradient(dtype, T, d_in, d_out, k):
    lib = native.kernel()
    if lib is None:
        pytest.skip("kernel unavailable")
    g0 = torch.Generator().manual_seed(T + d_in)
    g = torch.randn(T, d_out, generator=g0).to(dtype)
    x = torch.randn(T, d_in, generator=g0).to(dtype)
    idx = torch.rand(d_out, d_in, generator=g0).topk(k, dim=1).indices.sort(dim=1).values.to(torch.int32)
    dense = g.double().t() @ x.double()  # [d_out, d_in]
    want = dense.gather(1, idx.long()).float()
    got = sddmm_mod._sddmm_native(lib, g, x, idx)
    assert got.dtype == torch.float32 and got.shape == (d_out, k)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_native_sddmm_worked_example():
    lib = native.kernel()
    if lib is None:
        pytest.skip("kernel unavailable")
    g = torch.tensor([[1.0, 2.0]])
    x = torch.tensor([[3.0, 4.0, 5.0]])
    idx = torch.tensor([[2], [0]], dtype=torch.int32)
    assert sddmm_mod._sddmm_native(lib, g, x, idx).tolist() == [[5.0], [6.0]]


def test_native_sddmm_strided_rows():
    """A row stride larger than the width (a column slice of a bigger buffer) is honoured."""
    lib = native.kernel()
    if lib is None:
        pytest.skip("kernel unavailable")
    big_x = torch.randn(100, 50)
    big_g = torch.randn(100, 30)
    x, g = big_x[:, 5:45], big_g[:, :20]
    idx = torch.rand(20, 40).topk(4, dim=1).indices.sort(dim=1).values.to(torch.int32)
    want = (g.t() @ x).gather(1, idx.long())
    torch.testing.assert_close(sddmm_mod._sddmm_native(lib, g, x, idx), want, rtol=1e-5, atol=1e-5)


def test_unwritable_cache_still_builds(monkeypatch, tmp_path):
    if native._compiler() is None:
        pytest.skip("no C compiler on this machine")
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("NEUROADA_CACHE_DIR", str(blocker / "sub"))
    monkeypatch.setenv("NEUROADA_NATIVE", "1")
    lib = native._load()
    assert lib is not None and lib.neuroada_abi_version() == native.abi()


def test_portable_build_gives_the_same_results(monkeypatch, tmp_path):
    """The build without -march=native (no AVX2 tiles or eight-way dots) agrees with the fast one."""
    fast = native.kernel()
    if fast is None:
        pytest.skip("kernel unavailable")
    monkeypatch.setattr(native, "_NATIVE_ARCH", [])
    monkeypatch.setenv("NEUROADA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("NEUROADA_NATIVE", "1")
    portable = native._load()
    g0 = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.randn(150, 37, generator=g0).to(dtype)
        x = torch.randn(150, 45, generator=g0).to(dtype)
        idx = torch.rand(37, 45, generator=g0).topk(11, dim=1).indices.sort(dim=1).values.to(torch.int32)
        torch.testing.assert_close(
            sddmm_mod._sddmm_native(portable, g, x, idx), sddmm_mod._sddmm_native(fast, g, x, idx), rtol=1e-5, atol=1e-5
        )
    w = (torch.randn(300, 500, generator=g0) * 0.02).to(torch.bfloat16)
    want = select(w, 20)
    monkeypatch.setitem(native._state, "lib", portable)
    assert torch.equal(select(w, 20), want)


@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_native_refresh_writes_the_same_bits_as_torch(dtype, kind, parts, monkeypatch, sddmm_lib):
    """The C refresh (W0_sel + delta, cast, scattered), in one part or with its rows split in three
    (on torch's OpenMP team, or one after another without one), equals the torch expression bit
    for bit.

    (Finite values only: torch's own bf16 encoding of NaN differs between its scalar and SIMD
    paths, and training stops on a NaN loss before a NaN delta is ever written.)"""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from neuroada_tools.io.sidecar import IndexSidecar, TensorEntry
    from neuroada_tools.train.bypass import attach

    monkeypatch.setattr(torch, "get_num_threads", lambda: parts)
    monkeypatch.setattr(bypass_layer, "_REFRESH_ENTRIES_PER_PART", 16)  # 24 rows x 7: up to 10 parts
    results = []
    for lib in (sddmm_lib, None):
        torch.manual_seed(0)
        layer = nn.Linear(40, 24) if kind == "linear" else Conv1D(24, 40)
        layer = layer.to(dtype)
        logical = layer.weight if kind == "linear" else layer.weight.t()
        idx = select(logical.detach(), 7)
        index = IndexSidecar(
            k=7,
            criterion="magnitude",
            indices={"0.weight": idx},
            entries={"0.weight": TensorEntry((24, 40), "out_in" if kind == "linear" else "in_out", "F32", "0" * 64)},
        )
        net = nn.Sequential(layer)
        (delta,) = attach(net, index).values()
        with torch.no_grad():
            delta.copy_(torch.randn(24, 7) * 0.3)
            delta[1, 1] = 1e-9  # rounds away in bf16: exercises round-to-nearest-even
        with monkeypatch.context() as m:
            m.setitem(native._state, "lib", lib)
            v = layer.weight._version
            layer._neuroada_refresh()
            assert layer.weight._version > v  # autograd sees the in-place write
        results.append(layer.weight.detach().clone())
    assert torch.equal(
        results[0].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
        results[1].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
    )


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_native_sddmm_thread_split(threads, monkeypatch, sddmm_lib):
    """The kernel's own thread split (parts of at least 64 tokens here): every thread count gives
    the dense gradient, and the same thread count gives the same bits twice."""
    lib = sddmm_lib
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(sddmm_mod, "_TOKENS_PER_THREAD", 64)  # split T=130 and T=700 as finely as C allows
    monkeypatch.setattr(sddmm_mod, "_TOKENS_PER_STARTED_THREAD", 64)
    g0 = torch.Generator().manual_seed(threads)
    for T in (1, 63, 64, 130, 700):
        g = torch.randn(T, 24, generator=g0)
        x = torch.randn(T, 90, generator=g0)
        idx = torch.rand(24, 90, generator=g0).topk(13, dim=1).indices.sort(dim=1).values.to(torch.int32)
        want = (g.double().t() @ x.double()).gather(1, idx.long()).float()
        first = sddmm_mod._sddmm_native(lib, g, x, idx)
        torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(sddmm_mod._sddmm_native(lib, g, x, idx), first)


@pytest.fixture(params=["openmp team", "threads started per call"])
def sddmm_lib(request):
    """The kernel library, bound to torch's OpenMP team or not (restored afterwards)."""
    lib = native.kernel()
    if lib is None:
        pytest.skip("kernel unavailable")
    if request.param == "openmp team" and not native.openmp_bound():
        pytest.skip("torch does not run on an OpenMP runtime here")
    if request.param != "openmp team":
        native.bind_openmp(lib, None)
    yield lib
    native.bind_openmp(lib, "auto" if native.openmp_bound() else None)


def test_sddmm_binds_to_torchs_openmp_team():
    """Where torch's parallel backend is OpenMP (the Linux CPU wheels), the SDDMM finds that
    runtime in the process and binds to it; unbinding and binding again work."""
    if "OpenMP" not in torch.__config__.parallel_info() or not native._loaded_openmp_runtime():
        pytest.skip("torch does not run on an OpenMP runtime here")
    lib = native.kernel()
    if lib is None:
        pytest.skip("kernel unavailable")
    assert native.openmp_bound()
    assert "omp" in native._loaded_openmp_runtime().rsplit("/", 1)[1]
    assert native.bind_openmp(lib, None) is False
    assert native.bind_openmp(lib, "/nonexistent/libgomp.so.1") is False  # a bad path: stays unbound
    assert native.bind_openmp(lib) is True


@pytest.mark.parametrize("threads", [2, 3])
def test_openmp_team_and_started_threads_give_the_same_bits(threads, monkeypatch):
    """The parts and their summing order depend only on the part count, not on who runs them."""
    lib = native.kernel()
    if lib is None or not native.openmp_bound():
        pytest.skip("no OpenMP team to compare with")
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(sddmm_mod, "_TOKENS_PER_THREAD", 64)  # the same part count on both paths
    monkeypatch.setattr(sddmm_mod, "_TOKENS_PER_STARTED_THREAD", 64)
    g0 = torch.Generator().manual_seed(threads)
    g = torch.randn(700, 50, generator=g0)
    x = torch.randn(700, 90, generator=g0)
    idx = torch.rand(50, 90, generator=g0).topk(13, dim=1).indices.sort(dim=1).values.to(torch.int32)
    team = sddmm_mod._sddmm_native(lib, g, x, idx)
    try:
        native.bind_openmp(lib, None)
        started = sddmm_mod._sddmm_native(lib, g, x, idx)
    finally:
        native.bind_openmp(lib)
    assert torch.equal(team.view(torch.int32), started.view(torch.int32))
    torch.testing.assert_close(team, (g.double().t() @ x.double()).gather(1, idx.long()).float(), rtol=1e-5, atol=1e-5)


def test_native_sddmm_from_several_threads_at_once(monkeypatch, sddmm_lib):
    """Callers at once (models trained in several threads) get their own partial sums, on torch's
    OpenMP team (each calling thread gets a team of its own) and on threads started per call."""
    import threading

    lib = sddmm_lib
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(sddmm_mod, "_TOKENS_PER_THREAD", 64)  # T=300: two parts per call
    monkeypatch.setattr(sddmm_mod, "_TOKENS_PER_STARTED_THREAD", 64)
    g0 = torch.Generator().manual_seed(11)
    cases = []
    for _ in range(4):
        g = torch.randn(300, 40, generator=g0)
        x = torch.randn(300, 60, generator=g0)
        idx = torch.rand(40, 60, generator=g0).topk(9, dim=1).indices.sort(dim=1).values.to(torch.int32)
        cases.append((g, x, idx, (g.double().t() @ x.double()).gather(1, idx.long()).float()))
    errors = []

    def run(case):
        g, x, idx, want = case
        for _ in range(30):
            got = sddmm_mod._sddmm_native(lib, g, x, idx)
            if not torch.allclose(got, want, rtol=1e-5, atol=1e-4):
                errors.append("mismatch")
                return

    threads = [threading.Thread(target=run, args=(c,)) for c in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_cli_shortens_the_openmp_spin_unless_told_otherwise():
    import os
    import subprocess
    import sys

    code = "import neuroada_tools.cli, os; print(os.environ.get('GOMP_SPINCOUNT'))"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "10000"
    env["GOMP_SPINCOUNT"] = "5"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "5"


def test_damaged_cached_library_is_rebuilt(monkeypatch, tmp_path):
    if native._compiler() is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setenv("NEUROADA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("NEUROADA_NATIVE", "1")
    cached = native._build(native._compiler())  # built but not loaded (a loaded file must not be overwritten)
    cached.write_bytes(b"\x7fELF truncated")
    lib = native._load()
    assert lib is not None and lib.neuroada_abi_version() == native.abi()
    assert cached.stat().st_size > 1000
