"""Benchmark `neuroada-tools index` against merely reading the checkpoint and the naive way.

Builds (once, cached in .bench/) a Llama checkpoint with real LLaMA-7B shapes (hidden 4096,
intermediate 11008, vocab 32000; random bf16 values; ``--layers`` blocks, 6 by default = 2.9 GB)
and measures, side by side in one run, each method in its own subprocess (so peak RSS is its own),
repetitions interleaved, page cache warm:

- read:  read every byte of the checkpoint files into a reused buffer;
- index (first run): ``neuroada_tools.index.build.run_index`` (what the CLI runs) with the architecture's
  target list not yet cached, so it imports the transformers modeling code and builds the meta model;
- index (cached): the same with the target list cached (every later run on this architecture);
- naive: ``LlamaForCausalLM.from_pretrained`` then ``W.float().abs().topk(k)`` per target weight.

GB/s is checkpoint bytes per second (all files) and, for index/naive, also target-weight bytes per
second. Prints a markdown table; ``--out FILE`` also writes it there.

    python bench/bench_index.py            # full (about 2-3 minutes here)
    python bench/bench_index.py --quick    # 1 layer, 1 repetition
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import build_llama7b_shapes as build  # noqa: E402
from _common import run_child_json

CHILD = r"""
import json, sys, time, resource
method, folder, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
from pathlib import Path
import torch
torch.set_num_threads(2)
files = sorted(Path(folder).glob("*.safetensors"))
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
import transformers  # imported by every method, so baselines are equal
base = hwm()
t0 = time.perf_counter()
if method == "read":
    buf = bytearray(64 << 20)
    mv = memoryview(buf)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(mv):
                pass
elif method in ("index-cold", "index"):
    import shutil, os
    if method == "index-cold":
        shutil.rmtree(Path(os.environ["NEUROADA_CACHE_DIR"]) / "targets", ignore_errors=True)
    from neuroada_tools.index.build import run_index
    out = Path(folder) / "bench.index.safetensors.out"
    run_index(folder, k, out, force=True)
    out.unlink()
elif method == "naive":
    from transformers import LlamaForCausalLM
    m = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    res = {}
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            res[name] = mod.weight.float().abs().topk(k, dim=1).indices.sort(dim=1).values.to(torch.int32)
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "peak_rss": hwm(), "rss_after_imports": base}))
"""
METHODS = {"read": "read", "index-cold": "index (first run)", "index": "index (cached)", "naive": "naive"}


def run_child(method: str, folder: Path, k: int, cache: Path) -> dict:
    return run_child_json(CHILD, [method, str(folder), str(k)], env={"NEUROADA_CACHE_DIR": str(cache)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("-k", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dir", type=Path, default=ROOT / ".bench")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.quick:
        a.layers, a.reps = 1, 1
    folder = a.dir / f"llama7b-shapes-{a.layers}L"
    build(folder, a.layers)
    sys.path.insert(0, str(ROOT))
    from neuroada_tools.index.targets import resolve_targets
    from neuroada_tools.io.checkpoint import open_checkpoint

    ckpt = open_checkpoint(folder)
    total = ckpt.total_bytes
    targets = resolve_targets(ckpt)
    target_bytes = sum(ckpt.tensors[t.name].raw.nbytes for t in targets)
    largest = max(ckpt.tensors[t.name].raw.nbytes for t in targets)
    cache = a.dir / "cache"  # the compiled kernel is built here once, before timing
    run_child("read", folder, a.k, cache)  # warm the page cache
    run_child("index", folder, a.k, cache)
    results: dict[str, list[dict]] = {m: [] for m in METHODS}
    for _ in range(a.reps):
        for m in results:
            results[m].append(run_child(m, folder, a.k, cache))
    med = {m: statistics.median(r["seconds"] for r in rs) for m, rs in results.items()}
    rss = {m: max(r["peak_rss"] for r in rs) for m, rs in results.items()}
    base = {m: max(r["rss_after_imports"] for r in rs) for m, rs in results.items()}
    gb = 1e9
    lines = [
        f"checkpoint: {total / gb:.2f} GB bf16, {a.layers} LLaMA-7B blocks ({len(targets)} target weights, "
        f"{target_bytes / gb:.2f} GB; largest {largest / 2**20:.0f} MiB), k={a.k}, {a.reps} reps interleaved, median",
        "",
        "| method | seconds | GB/s (file) | GB/s (targets) | vs naive | peak RSS | RSS over imports |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, label in METHODS.items():
        s = med[m]
        tgt = f"{target_bytes / s / gb:.2f}" if m != "read" else "-"
        lines.append(
            f"| {label} | {s:.2f} | {total / s / gb:.2f} | {tgt} | {med['naive'] / s:.2f}x | "
            f"{rss[m] / 2**20:.0f} MiB | {(rss[m] - base[m]) / 2**20:.0f} MiB |"
        )
    budget = 2 * largest + 300 * 2**20
    lines += [
        "",
        f"index (cached) vs read: {med['read'] / med['index']:.2f}x the reading speed; vs naive: "
        f"{med['naive'] / med['index']:.2f}x faster (first run: {med['naive'] / med['index-cold']:.2f}x)",
    ]
    for m in ("index-cold", "index"):
        lines.append(
            f"RSS target (2 x largest tensor + 300 MiB = {budget / 2**20:.0f} MiB): {METHODS[m]} peak "
            f"{rss[m] / 2**20:.0f} MiB ({'met' if rss[m] <= budget else 'MISSED'}; over imports "
            f"{(rss[m] - base[m]) / 2**20:.0f} MiB)"
        )
    table = "\n".join(lines)
    print(table)
    if a.out:
        a.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
