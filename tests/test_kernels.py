"""kernels/: the torch ops (opcheck, meta tensors, torch.compile) and the three loading rules
(a safe cache folder, a fork after use, no compiler)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from neuroada_tools.kernels import native
from neuroada_tools.kernels import ops as kernel_ops  # noqa: F401  (registers torch.ops.neuroada.*)
from neuroada_tools.kernels.reference import sddmm as reference_sddmm
from neuroada_tools.kernels.refresh import reference_refresh_

ROOT = Path(__file__).resolve().parents[1]


def _inputs(dtype=torch.float32, T=37, d_in=23, d_out=11, k=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(T, d_out, generator=gen).to(dtype)
    x = torch.randn(T, d_in, generator=gen).to(dtype)
    idx = torch.stack([torch.randperm(d_in, generator=gen)[:k].sort().values for _ in range(d_out)]).int()
    return g, x, idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sddmm_op_matches_the_reference_and_passes_opcheck(dtype):
    g, x, idx = _inputs(dtype)
    got = torch.ops.neuroada.sddmm(g, x, idx)
    torch.testing.assert_close(got, reference_sddmm(g, x, idx), rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.neuroada.sddmm.default, (g, x, idx))


@pytest.mark.parametrize("largest", [True, False])
def test_select_rows_op_matches_the_reference_and_passes_opcheck(largest):
    from neuroada_tools.index.criteria import reference_select

    w = torch.randn(40, 300, generator=torch.Generator().manual_seed(1))
    got = torch.ops.neuroada.select_rows(w, 7, largest)
    assert torch.equal(got, reference_select(w, 7, largest=largest))
    torch.library.opcheck(torch.ops.neuroada.select_rows.default, (w, 7, largest))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True])
def test_refresh_op_writes_the_reference_bits_and_passes_opcheck(dtype, transposed):
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(13, 29, generator=gen).to(dtype)
    _, _, idx = _inputs(d_in=29, d_out=13, k=5, seed=3)
    w0 = base.gather(1, idx.long())
    delta = torch.randn(13, 5, generator=gen)
    want = base.clone()
    reference_refresh_(want, idx, w0, delta)
    store = base.t().contiguous() if transposed else base.clone()
    logical = store.t() if transposed else store  # Conv1D: a transposed view of the stored weight
    torch.ops.neuroada.refresh_(logical, idx, w0, delta)
    assert torch.equal(logical, want)
    torch.library.opcheck(torch.ops.neuroada.refresh_.default, (base.clone(), idx, w0, delta))


def test_ops_on_meta_tensors_give_shapes_without_computing():
    g = torch.empty(5, 8, device="meta")
    x = torch.empty(5, 30, device="meta")
    idx = torch.empty(8, 3, dtype=torch.int32, device="meta")
    out = torch.ops.neuroada.sddmm(g, x, idx)
    assert out.device.type == "meta" and out.shape == (8, 3) and out.dtype == torch.float32
    sel = torch.ops.neuroada.select_rows(torch.empty(8, 30, device="meta"), 3, True)
    assert sel.shape == (8, 3) and sel.dtype == torch.int32


def test_a_bypassed_linear_runs_under_torch_compile():
    from neuroada_tools.io.sidecar import IndexSidecar, TensorEntry
    from neuroada_tools.train import bypass

    torch.manual_seed(4)
    layer = torch.nn.Sequential(torch.nn.Linear(24, 16))
    _, _, idx = _inputs(d_in=24, d_out=16, k=3, seed=5)
    index = IndexSidecar(k=3, criterion="magnitude", indices={"0.weight": idx},
                         entries={"0.weight": TensorEntry((16, 24), "out_in", "F32", "0" * 64)})
    params = bypass.attach(layer, index)
    with torch.no_grad():
        params["0.weight"].copy_(torch.randn(16, 3))
    x = torch.randn(6, 24)
    eager = layer(x)
    eager.square().sum().backward()
    want_grad = params["0.weight"].grad.clone()
    params["0.weight"].grad = None
    bypass.set_mode(layer, "fused")  # restores the base; the compiled forward refreshes it again
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=False)
    got = compiled(x)
    got.square().sum().backward()
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(params["0.weight"].grad, want_grad)


def test_kernels_keep_working_in_a_process_forked_after_they_ran():
    if native.kernel() is None:
        pytest.skip("compiled kernels unavailable here")
    from neuroada_tools.index.criteria import select

    g, x, idx = _inputs(T=700, d_in=257, d_out=65, k=9)  # several parts: the OpenMP team is used
    w = torch.randn(300, 700)
    want_sddmm, want_select = torch.ops.neuroada.sddmm(g, x, idx), select(w, 9)
    for _ in range(3):  # the selection's thread pool has idle workers now (those a child lacks)
        select(w, 9)
    time.sleep(0.2)
    pid = os.fork()
    if pid == 0:  # child: the same calls must give the same bits, and return (a hang fails in 60 s)
        signal.alarm(60)
        ok = torch.equal(torch.ops.neuroada.sddmm(g, x, idx), want_sddmm) and torch.equal(select(w, 9), want_select)
        os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _run(code: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    full = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def test_a_cache_folder_others_can_write_is_not_loaded_from(tmp_path):
    cache = tmp_path / "cache"
    (cache / "native").mkdir(parents=True)
    os.chmod(cache / "native", 0o777)
    code = "import torch; from neuroada_tools.kernels import native; lib = native.kernel(); print(lib._name)"
    r = _run(code, {"NEUROADA_CACHE_DIR": str(cache), "NEUROADA_NATIVE": "auto"})
    if "no C compiler" in r.stderr:
        pytest.skip("no C compiler here")
    assert r.returncode == 0, r.stderr
    assert not r.stdout.strip().startswith(str(cache))  # built into a private temporary folder instead
    assert list((cache / "native").iterdir()) == []
    assert r.stderr.count("writable by group or others (mode 777)") == 1


def test_unsafe_folder_names_the_owner_and_the_mode(tmp_path, monkeypatch):
    os.chmod(tmp_path, 0o700)
    assert native.unsafe_folder(tmp_path) is None
    os.chmod(tmp_path, 0o720)
    assert native.unsafe_folder(tmp_path) == "writable by group or others (mode 720)"
    os.chmod(tmp_path, 0o700)
    monkeypatch.setattr(os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)
    assert native.unsafe_folder(tmp_path) == f"owned by uid {os.stat(tmp_path).st_uid}, not by this user"
    assert stat.S_IMODE(os.stat(tmp_path).st_mode) == 0o700


def test_without_a_compiler_the_torch_kernels_run_said_once_and_recorded_in_json(tmp_path, fixture_models):
    env = {"PATH": str(tmp_path), "CC": "", "NEUROADA_NATIVE": "auto", "NEUROADA_CACHE_DIR": str(tmp_path / "c")}
    code = ("import sys; from neuroada_tools.cli import main; "
            f"sys.argv = ['neuroada-tools', 'index', {str(fixture_models['llama'])!r}, '-k', '4', '-o', "
            f"{str(tmp_path / 'i.index.safetensors')!r}, '--json', '-q']; main()")
    r = _run(code, env, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["kernels"] == "torch (no C compiler found (set CC))"
    assert summary["selection_kernel"] == "torch"
    assert r.stderr.count("compiled kernels unavailable (no C compiler found (set CC))") == 1
