"""The compiled kernels on their own: build time, the SDDMM against the torch paths it replaces,
and one layer with only frozen / NeuroAda / LoRA interleaved.

    python bench/bench_kernels.py                        # about 3 minutes on 2 cores
    GOMP_SPINCOUNT=300000 python bench/bench_kernels.py  # libgomp's default spin, for comparison
    python bench/bench_kernels.py --shape 1024,1024,2048  # one layer shape only

1. Building ``kernels/csrc/*.c`` into an empty cache folder (what a first use costs).
2. ``bypass.sddmm`` alone on the layer shapes of ``bench_bypass.py`` (and any ``--shape``): the
   compiled kernel on 2 threads of torch's OpenMP team, on 2 threads it starts itself (unbound,
   ``native.bind_openmp(lib, None)``) and on 1 thread, ``torch.sparse.sampled_addmm`` and the
   per-column gather (``SDDMM_BACKEND``); each
   repetition runs a frozen layer's backward matmul (``g @ W``) first, as inside a backward pass,
   so torch's OpenMP threads are in the state they are in there.
3. The per-forward refresh alone: ``kernels/csrc/refresh.c`` with its rows split in two parts on torch's
   OpenMP team and in one part, against torch's ``scatter_``.
4. One layer forward + backward with only frozen, NeuroAda and LoRA at matched parameters
   interleaved (``bench_bypass.layer_methods``; the full table interleaves six methods).

Medians of interleaved repetitions; milliseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from neuroada_tools.kernels import native  # noqa: E402

native.shorten_openmp_spin()  # as the CLI does (an exported GOMP_SPINCOUNT wins)

import torch  # noqa: E402

from neuroada_tools.index.criteria import select  # noqa: E402
from neuroada_tools.kernels import sddmm as sddmm_mod  # noqa: E402
from neuroada_tools.train import bypass  # noqa: E402

SHAPES = [(4096, 4096, 512), (4096, 11008, 512), (1024, 1024, 2048)]  # d_in, d_out, T


def median_ms(fns: dict, reps: int, before=None) -> dict[str, float]:
    times: dict[str, list[float]] = {n: [] for n in fns}
    for f in fns.values():
        f()
    for r in range(reps):
        names = list(fns)
        for n in names[r % len(names):] + names[: r % len(names)]:
            if before:
                before()
            t = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t)
    return {n: statistics.median(v) * 1e3 for n, v in times.items()}


_TEAM: list = []  # the OpenMP entry points the kernel is bound to (found once: finding them takes ~1 ms)


def with_backend(backend: str, threads: int, g, x, idx, team: bool = True):
    """bypass.sddmm with ``backend`` on ``threads`` threads; ``team=False``: the compiled kernel
    unbound from torch's OpenMP team (threads started per call), bound again after the call."""
    def run():
        old, sddmm_mod.SDDMM_BACKEND = sddmm_mod.SDDMM_BACKEND, backend
        torch.set_num_threads(threads)
        lib = native.kernel()
        if not team:
            lib.neuroada_sddmm_set_openmp(None, None, None)
        try:
            bypass.sddmm(g, x, idx)
        finally:
            sddmm_mod.SDDMM_BACKEND = old
            torch.set_num_threads(2)
            if not team:
                lib.neuroada_sddmm_set_openmp(*_TEAM)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--layer-reps", type=int, default=15, help="0 skips the one-layer part")
    ap.add_argument("--shape", action="append", metavar="D_IN,D_OUT,T",
                    help="only this layer shape (repeatable); default: the three of bench_bypass.py")
    a = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in a.shape] if a.shape else SHAPES
    torch.set_num_threads(2)
    print(f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}, torch {torch.__version__}, 2 threads unless noted\n")

    with tempfile.TemporaryDirectory() as d:
        os.environ["NEUROADA_CACHE_DIR"] = d
        t = time.perf_counter()
        lib = native._load()
        print(f"build of kernels/csrc/*.c into an empty cache: {time.perf_counter() - t:.2f} s\n")
    if lib is None:
        raise SystemExit("no C compiler: nothing to compare")
    native._state["lib"] = lib
    native._state["openmp"] = native.bind_openmp(lib)  # what kernel() does when it loads the library

    print("SDDMM alone, ms (median of interleaved repetitions, each after a `g @ W` as in a backward):\n")
    print("| d_in→d_out | T | k | native, 2 threads (torch's OpenMP team) | native, 2 threads started per call "
          "| native, 1 thread | sampled_addmm | columns |")
    print("|---|---|---|---|---|---|---|---|")
    runtime = native._loaded_openmp_runtime()
    _TEAM[:] = native.openmp_entry_points(runtime) if native.openmp_bound() and runtime else [None, None, None]
    if not native.openmp_bound():
        print("(torch does not run on an OpenMP runtime here: both native columns start their threads)\n")
    g0 = torch.Generator().manual_seed(0)
    for d_in, d_out, T in shapes:
        W = torch.randn(d_out, d_in, generator=g0) * d_in**-0.5
        x = torch.randn(T, d_in, generator=g0)
        g = torch.randn(T, d_out, generator=g0)
        for k in (1, 20):
            idx = select(W, k)
            runs = (("native", 2, True), ("native", 2, False), ("native", 1, True), ("sampled_addmm", 2, True),
                    ("columns", 2, True))
            sd = median_ms({f"{b}/{th}/{team}": with_backend(b, th, g, x, idx, team) for b, th, team in runs},
                           a.reps, before=lambda: g @ W)
            v = " | ".join(f"{t:.2f}" for t in sd.values())
            print(f"| {d_in}→{d_out} | {T} | {k} | {v} |")

    print("\nRefresh alone (W0_sel + delta written at the selected entries), microseconds, each repetition "
          "after a `g @ W'` with another weight W' (the refreshed weight out of the near caches, as in a step):\n")
    print("| d_in→d_out | k | compiled, 2 parts on torch's OpenMP team | compiled, 1 part | torch scatter_ "
          "| unchanged-delta check + copy |")
    print("|---|---|---|---|---|---|")
    for d_in, d_out, T in shapes:
        W = torch.randn(d_out, d_in, generator=g0)
        other = torch.randn(d_out, d_in, generator=g0)
        g = torch.randn(T, d_out, generator=g0)
        for k in (1, 20):
            idx = select(W, k)
            w0 = W.gather(1, idx.long())
            delta = torch.randn(d_out, k, generator=g0) * 1e-3
            fns = {
                "team": lambda: lib.neuroada_refresh_f32(W.data_ptr(), W.stride(0), W.stride(1), idx.data_ptr(),
                                                         w0.data_ptr(), delta.data_ptr(), d_out, k, 2),
                "compiled": lambda: lib.neuroada_refresh_f32(W.data_ptr(), W.stride(0), W.stride(1), idx.data_ptr(),
                                                             w0.data_ptr(), delta.data_ptr(), d_out, k, 1),
                "torch": lambda: W.scatter_(1, idx, w0 + delta),  # the torch path of layer._neuroada_refresh
                # what every refresh adds to decide whether it can be skipped (layer._neuroada_refresh):
                # compare the delta's bits with those last written, keep a copy
                "check": lambda: lib.neuroada_keep_if_changed(kept.data_ptr(), delta.data_ptr(), delta.numel() * 4),
            }
            kept = delta.clone()  # unchanged: the whole compare runs (a changed delta stops at its first entry)
            rf = median_ms(fns, a.reps * 3, before=lambda: g @ other)
            print(
                f"| {d_in}→{d_out} | {k} | {rf['team'] * 1e3:.0f} | {rf['compiled'] * 1e3:.0f} | "
                    f"{rf['torch'] * 1e3:.0f} | "
                f"{rf['check'] * 1e3:.0f} |"
            )

    if a.layer_reps <= 0:
        return
    import bench_bypass

    print(
        "\nOne layer, forward + backward, only three methods interleaved "
        f"({a.layer_reps} reps; median of per-repetition ratios to frozen):\n"
    )
    print("| d_in→d_out | T | k | frozen ms | NeuroAda | LoRA r=match |")
    print("|---|---|---|---|---|---|")
    for d_in, d_out, T in shapes:
        for k in (1, 20):
            methods, _, _, r = bench_bypass.layer_methods(d_in, d_out, T, k)
            res = bench_bypass.interleaved(
                {m: methods[m] for m in ("frozen", "neuroada", "lora_match")}, a.layer_reps, "frozen"
            )
            print(
                f"| {d_in}→{d_out} | {T} | {k} | {res['frozen'][0] * 1e3:.1f} | {res['neuroada'][1]:.3f} | "
                f"{res['lora_match'][1]:.3f} (r={r}) |"
            )


if __name__ == "__main__":
    main()
