"""Benchmark `merge --to safetensors` against a plain copy of the same checkpoint files.

Uses the LLaMA-7B-shaped bf16 checkpoint of bench_index.py (cached in .bench/), an index with
k=20 and a random fp32 delta. Each method runs in its own subprocess (own peak RSS), repetitions
interleaved, page cache warm, outputs written to the same disk:

- copy:  ``shutil.copyfile`` of every checkpoint file (the floor for writing the same bytes);
- merge: ``neuroada_tools.export.merge.merge_to_folder`` (streams, verifies fingerprints, merges,
  writes, fsyncs), without the parity check.

    python bench/bench_merge.py            # 6 blocks, 2.9 GB, 3 reps
    python bench/bench_merge.py --quick    # 1 block, 1 rep
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import build_llama7b_shapes, run_child_json  # noqa: E402

CHILD = r"""
import json, os, shutil, sys, time
method, folder, index, delta, out = sys.argv[1:6]
from pathlib import Path
import torch
torch.set_num_threads(2)
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
import torch  # merge itself needs no transformers (no task head here): import only what it uses
from neuroada_tools.export.merge import merge_to_folder
base = hwm()
shutil.rmtree(out, ignore_errors=True)
t0 = time.perf_counter()
if method == "copy":
    os.makedirs(out)
    for f in sorted(Path(folder).iterdir()):
        if f.is_file() and not f.name.endswith(".out"):
            shutil.copyfile(f, Path(out) / f.name)
            with open(Path(out) / f.name, "rb+") as fh:
                os.fsync(fh.fileno())
else:
    merge_to_folder(folder, index, delta, out)
dt = time.perf_counter() - t0
shutil.rmtree(out, ignore_errors=True)
print(json.dumps({"seconds": dt, "peak_rss": hwm(), "rss_after_imports": base}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dir", type=Path, default=ROOT / ".bench")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.quick:
        a.layers, a.reps = 1, 1
    folder = a.dir / f"llama7b-shapes-{a.layers}L"
    build_llama7b_shapes(folder, a.layers)
    sys.path.insert(0, str(ROOT))
    import torch

    from neuroada_tools.index.build import run_index
    from neuroada_tools.io.checkpoint import open_checkpoint
    from neuroada_tools.io.sidecar import DeltaSidecar, read_index, write_delta

    index_path = a.dir / f"llama7b-{a.layers}L.k20.index.safetensors"
    delta_path = a.dir / f"llama7b-{a.layers}L.k20.delta.safetensors"
    if not delta_path.exists():
        run_index(folder, 20, index_path, force=True)
        index = read_index(index_path)
        g = torch.Generator().manual_seed(0)
        write_delta(delta_path, DeltaSidecar(index.digest, {n: torch.randn(t.shape, generator=g) * 1e-3
                                                            for n, t in index.indices.items()}))
    ckpt = open_checkpoint(folder)
    total = ckpt.total_bytes
    largest = max(r.raw.nbytes for r in ckpt.tensors.values())
    out = a.dir / "merge-out"
    args = [str(folder), str(index_path), str(delta_path), str(out)]
    results: dict[str, list[dict]] = {"copy": [], "merge": []}
    run_child_json(CHILD, ["copy", *args])  # warm the page cache
    for _ in range(a.reps):
        for m in results:
            results[m].append(run_child_json(CHILD, [m, *args]))
    med = {m: statistics.median(r["seconds"] for r in rs) for m, rs in results.items()}
    rss = {m: max(r["peak_rss"] for r in rs) for m, rs in results.items()}
    base = {m: max(r["rss_after_imports"] for r in rs) for m, rs in results.items()}
    budget = 2 * largest + 300 * 2**20
    lines = [
        f"checkpoint: {total / 1e9:.2f} GB bf16, {a.layers} LLaMA-7B blocks, k=20 delta; {a.reps} reps interleaved, "
            "median",
        "",
        "| method | seconds | GB/s | vs copy | peak RSS | RSS over imports |",
        "|---|---|---|---|---|---|",
    ]
    for m in ("copy", "merge"):
        lines.append(
            f"| {m} | {med[m]:.2f} | {total / med[m] / 1e9:.2f} | {med['copy'] / med[m]:.2f}x | "
            f"{rss[m] / 2**20:.0f} MiB | {(rss[m] - base[m]) / 2**20:.0f} MiB |"
        )
    lines += [
        "",
        f"merge throughput {med['copy'] / med['merge']:.2f}x a plain copy (target >= 0.5x: "
        f"{'met' if med['copy'] / med['merge'] >= 0.5 else 'MISSED'})",
        f"RSS target (2 x largest tensor {largest / 2**20:.0f} MiB + 300 MiB = {budget / 2**20:.0f} MiB): "
        f"merge peak {rss['merge'] / 2**20:.0f} MiB ({'met' if rss['merge'] <= budget else 'MISSED'})",
    ]
    table = "\n".join(lines)
    print(table)
    shutil.rmtree(out, ignore_errors=True)
    if a.out:
        a.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
