"""Time ``select.select`` alone (no file I/O) on LLaMA-7B-shaped bf16 weights.

    python bench/bench_select.py [--threads 1] [--reps 3]

Prints GB/s of bf16 weight per second for 11008x4096 (gate/up) and 4096x11008 (down), k=20,
checking each result against the stable-sort reference once.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from neuroada_tools.index.criteria import reference_select, select  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("-k", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    for shape in ((11008, 4096), (4096, 11008)):
        w = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        assert torch.equal(select(w, a.k), reference_select(w, a.k))
        times = []
        for _ in range(a.reps):
            t = time.perf_counter()
            select(w, a.k)
            times.append(time.perf_counter() - t)
        print(f"{shape[0]}x{shape[1]} bf16, k={a.k}, {a.threads} thread(s): "
              f"{w.numel() * 2 / statistics.median(times) / 1e9:.2f} GB/s")


if __name__ == "__main__":
    main()
