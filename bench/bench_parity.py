"""Parity on a real LLM: the calibrated check's measured differences, tolerances and cost on SmolLM2.

For each k (default 1 and 20): index SmolLM2-135M-Instruct, train a delta for a few steps on BoolQ
($NEUROADA_DATA, default ../shared/data), merge to safetensors without the check (timed), then run
the check with ``--generate 16`` in a child process (timed, peak RSS) and print, per comparison, the
max abs difference next to its tolerance, the noise floor, and the check's seconds against the
merge's. ``--seeds N`` repeats the logit comparisons over N more input seeds (the calibration of
``parity.NOISE_FACTOR``): ratio = (form vs float64) / noise floor.

    python bench/bench_parity.py                 # k=1 and k=20, 2 training steps each
    python bench/bench_parity.py --k 1 --seeds 4
    python bench/bench_parity.py --model DIR --seeds 8 --seeds-only I.index.safetensors D.delta.safetensors MERGED ONNX
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "neuroada_tools"]


def run(*args: str) -> float:
    t = time.perf_counter()
    subprocess.run([*CLI, *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


CHILD = r"""
import json, resource, sys, time
from neuroada_tools.check.run import run_check
t = time.perf_counter()
r = run_check(*sys.argv[1:4], merged_dir=sys.argv[4], generate=16, raise_on_failure=False)
d = r.to_dict(); d["seconds"] = time.perf_counter() - t
d["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(d))
"""

SEEDS = r"""
import json, sys
from pathlib import Path
from neuroada_tools.check.parity import compare_logits, evaluated_in, make_fresh_inputs, run_onnx, run_torch
from neuroada_tools.check.run import load_unmerged
from neuroada_tools.train import bypass
from neuroada_tools.hf import load_model
from neuroada_tools.hf.signature import first_id_within, input_vocab_size
un, task = load_unmerged(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
merged = load_model(Path(sys.argv[4]), task).eval()
vocab = input_vocab_size(un); cfg = un.config
pad = first_id_within([cfg.pad_token_id, cfg.eos_token_id], vocab)
for seed in range(int(sys.argv[5])):
    inputs = make_fresh_inputs(cfg, seed=seed, pad_token_id=pad, vocab_size=vocab)
    mask = inputs["attention_mask"]
    own = run_torch(un, inputs)
    bypass.set_mode(un, "fused"); fused = run_torch(un, inputs); bypass.set_mode(un, "reference")
    with evaluated_in(un):
        ref = run_torch(un, inputs)
    n1, n2 = compare_logits(ref, own, mask).max_abs, compare_logits(ref, fused, mask).max_abs
    row = {"seed": seed, "noise_reference": n1, "noise_fused": n2, "noise": max(n1, n2)}
    for name, logits in [("merged", run_torch(merged, inputs))] + (
            [("onnx", run_onnx(Path(sys.argv[6]) / "model.onnx", inputs))] if len(sys.argv) > 6 else []):
        row[name] = compare_logits(ref, logits, mask).max_abs
        row[name + "_ratio"] = row[name] / row["noise"]
    print(json.dumps(row))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: the cached SmolLM2)")
    ap.add_argument("--k", type=int, action="append", default=None)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=0, help="more input seeds for the noise-floor ratios")
    ap.add_argument("--seeds-only", nargs=4, metavar=("INDEX", "DELTA", "MERGED", "ONNX_DIR"), default=None,
                    help="only the seed ratios, for existing sidecars, a merged folder and a torch ONNX export")
    args = ap.parse_args()
    if args.model is None:
        from neuroada_tools.hf.gguf import smollm2_folder

        args.model = smollm2_folder()
    if args.seeds_only:
        ip, dp, merged, onnx_dir = args.seeds_only
        out_s = subprocess.run([sys.executable, "-c", SEEDS, str(args.model), ip, dp, merged, str(args.seeds or 4),
                                onnx_dir], check=True, capture_output=True, text=True).stdout
        print(out_s, end="")
        return
    data_root = Path(os.environ.get("NEUROADA_DATA", ROOT.parent / "shared" / "data"))
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        data = tmp / "boolq.json"
        data.write_text(json.dumps(json.loads((data_root / "boolq" / "train.json").read_text())[:64]))
        for k in args.k or [1, 20]:
            ip, dp, out = tmp / f"k{k}.index.safetensors", tmp / f"k{k}.delta.safetensors", tmp / f"m{k}"
            run(*map(str, ["index", args.model, "-k", k, "-o", ip, "-q"]))
            run(*map(str, ["train-sparse", "--model", args.model, "--index", ip, "--data", data, "-o", dp,
                           "--max-steps", args.steps, "--batch-size", 4, "--max-length", 96,
                           "--lr", 9e-3 if k == 1 else 7e-4, "--device", "cpu", "-q"]))
            merge_s = run(*map(str, ["merge", "--model", args.model, "--index", ip, "--delta", dp, "-o", out,
                                     "--no-check", "-q"]))
            res = json.loads(subprocess.run([sys.executable, "-c", CHILD, str(args.model), str(ip), str(dp), str(out)],
                                            check=True, capture_output=True, text=True).stdout)
            n = res["noise"]
            print(f"k={k}: noise floor (unmerged fp32 vs float64) {n['max_abs']:.2e} at logit scale "
                  f"{n['ref_scale']:.1f}; check {res['seconds']:.1f} s ({res['seconds'] / merge_s:.2f}x the merge's "
                  f"{merge_s:.1f} s), peak RSS {res['peak_rss_mib']:.0f} MiB")
            for name, c in res["comparisons"].items():
                print(f"  {name:24s} max abs {c['max_abs']:.2e}  tolerance {c['tolerance']:.2e}  "
                      f"{'ok' if c['passed'] else 'FAILED'}")
            g = res["generation"]
            print(f"  generation 16 tokens x 3 prompts: {'same tokens' if g['mismatch'] is None else g['mismatch']}")
            if args.seeds:
                out_s = subprocess.run([sys.executable, "-c", SEEDS, str(args.model), str(ip), str(dp), str(out),
                                        str(args.seeds)], check=True, capture_output=True, text=True).stdout
                for line in out_s.splitlines():
                    s = json.loads(line)
                    forms = ", ".join(f"{f} {s[f]:.2e} ({s[f + '_ratio']:.2f}x)" for f in ("merged", "onnx") if f in s)
                    print(f"  seed {s['seed']}: noise reference path {s['noise_reference']:.2e}, fused path "
                          f"{s['noise_fused']:.2e}; vs float64: {forms}")


if __name__ == "__main__":
    main()
