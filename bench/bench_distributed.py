"""train-sparse on 1 vs 2 processes (torchrun), DDP and FSDP2: tokens per second and per-rank memory.

The 50M Llama of issue 8 (hidden 1024, 4 layers, intermediate 2816, vocab 32000, random weights,
fp32), k=20, ~250-token text examples, ``--batch-size 4`` per process (so 2 processes train a
global batch of 8), one thread per process. Every rank runs ``train`` in its own interpreter and
reports: the base weights it holds (the summary's ``base_bytes``: its shards under FSDP2), the
loop's tokens per second (rank 0's summary: tokens over the loop's wall time), the anonymous
resident memory the model took (``RssAnon`` when training starts minus before loading:
the resident base and the deltas; the checkpoint's page cache, which the kernel can drop, is not
counted), ``RssAnon`` between steps, and the peak RSS.

    .venv/bin/python bench/bench_distributed.py [--steps 12] [--device cpu|cuda] [--keep DIR]

Targets (issue 8): 2 processes reach >= 1.7x the tokens per second of 1 (DDP); under FSDP2 each
rank's resident base is <= 0.6x DDP's. Whole-run timings on a shared 2-core machine need a quiet
machine: run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

RANK_SCRIPT = r"""
import json, os, resource, sys
def anon():  # anonymous resident memory: what the process holds, without the checkpoint's page cache
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
before = anon()
from neuroada_tools.train.loop import TrainConfig, train
cfg = TrainConfig(**json.loads(sys.argv[1]))
seen = {"start": None, "between": 0}
def on_start(total, start):
    seen["start"] = anon()
def on_step(info):
    seen["between"] = max(seen["between"], anon())
s = train(cfg, on_start=on_start, on_step=on_step)
rank = os.environ.get("RANK", "0")
out = {"rank": int(rank), "tokens": s.tokens, "seconds": s.seconds, "world": s.world_size,
       "base_mib": s.base_bytes / 2**20,
       "model_mib": (seen["start"] - before) / 2**20, "between_mib": seen["between"] / 2**20,
       "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
with open(sys.argv[2] + f".rank{rank}.json", "w") as f:
    json.dump(out, f)
"""


def build(folder: Path, examples: int) -> dict[str, Path]:
    """The model folder (with a small BPE tokenizer), its k=20 index and a text data file."""
    from _common import build_llama_50m

    from neuroada_tools.index.build import run_index

    model_dir = build_llama_50m(folder / "llama-50m")
    index = folder / "llama-50m.k20.index.safetensors"
    if not index.exists():
        run_index(model_dir, 20, index)
    data = folder / "text.jsonl"
    words = "the a of to in sparse neuron delta weight train model row column index merge export".split()
    with data.open("w") as f:
        for i in range(examples):
            text = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(160))
            f.write(json.dumps({"text": text}) + "\n")
    return {"model": model_dir, "index": index, "data": data}


def run(inputs: dict[str, Path], out: Path, world: int, fsdp: bool, steps: int, device: str) -> list[dict]:
    cfg = {"model": str(inputs["model"]), "index": str(inputs["index"]), "data": str(inputs["data"]),
           "output": str(out), "batch_size": 4, "max_length": 256, "max_steps": steps, "lr": 1e-4,
           "warmup_ratio": 0.0, "device": device, "fsdp": fsdp, "force": True}
    script = out.parent / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    argv = [str(script), json.dumps(cfg), str(out)]
    if world == 1:
        cmd = [sys.executable, *argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), *argv]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"{'fsdp' if fsdp else 'ddp'} x{world} failed:\n{p.stderr[-4000:]}")
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(world)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--keep", type=Path, help="build the model here and keep it (reused next time)")
    a = ap.parse_args()
    folder = a.keep or Path(tempfile.mkdtemp(prefix="bench-dist-"))
    folder.mkdir(parents=True, exist_ok=True)
    inputs = build(folder, examples=8 * a.steps)
    runs = {
        "1 process": run(inputs, folder / "one.delta.safetensors", 1, False, a.steps, a.device),
        "2 processes, DDP": run(inputs, folder / "ddp.delta.safetensors", 2, False, a.steps, a.device),
        "2 processes, FSDP2": run(inputs, folder / "fsdp.delta.safetensors", 2, True, a.steps, a.device),
    }
    base = runs["1 process"][0]
    tps1 = base["tokens"] / base["seconds"]
    print(f"train-sparse, Llama 50M (hidden 1024, 4 layers, vocab 32000) fp32, k=20, batch 4 per process, "
          f"{a.steps} steps, {a.device}, 1 thread per process\n")
    print("| run | tokens/s | vs 1 process | rank | base held (MiB) | model anon. RSS (MiB) "
          "| anon. RSS between steps (MiB) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, ranks in runs.items():
        tps = ranks[0]["tokens"] / ranks[0]["seconds"]
        for r in ranks:
            print(f"| {name} | {tps:,.0f} | {tps / tps1:.2f}x | {r['rank']} | {r['base_mib']:.0f} | "
                  f"{r['model_mib']:.0f} | "
                  f"{r['between_mib']:.0f} | {r['peak_mib']:.0f} |")
    ddp = max(r["base_mib"] for r in runs["2 processes, DDP"])
    fsdp = max(r["base_mib"] for r in runs["2 processes, FSDP2"])
    speed = runs["2 processes, DDP"][0]["tokens"] / runs["2 processes, DDP"][0]["seconds"] / tps1
    print(f"\nDDP 2 processes vs 1: {speed:.2f}x tokens/s (target >= 1.7x: {'met' if speed >= 1.7 else 'MISSED'})")
    print(f"FSDP2 base held per rank vs DDP: {fsdp / ddp:.2f}x (target <= 0.6x: "
          f"{'met' if fsdp / ddp <= 0.6 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
