"""ONNX for LLM serving: torch.onnx.export (with past) vs onnxruntime-genai's model builder (fp32, int4).

On SmolLM2-135M-Instruct with a k=1 delta (random, 0.01 scale, unless --index/--delta are given),
merged once to safetensors, then for each method:

- export seconds: the exporter alone on the merged folder, in a fresh interpreter (wall time of the
  child, imports included): ``export_onnx(..., with_past=True)`` for torch, ``build_genai`` for
  the builder (itself a ``python -m onnxruntime_genai.models.builder`` subprocess);
- disk: every file of the output folder (graphs, weights, tokenizer, configs);
- generation tokens/s: greedy, batch 1, ``--new-tokens`` new tokens after one chat prompt, EOS
  ignored, through ``neuroada-tools generate``'s own loop (``generate_ids`` on the form's session:
  ``model_with_past.onnx`` fed its presents on ONNX Runtime, or the ORT GenAI runtime), repetitions
  interleaved, median; for the genai builds also og's native loop (``generate_next_token``);
- greedy agreement: the share of the first method's (torch's) 32 tokens each method reproduces
  before its first difference (fp32 must give all of them; int4 shows how far it follows).

Ratios are to the torch export, side by side from the same run.

    python bench/bench_onnx_llm.py                  # ~6 minutes on 2 shared cores
    python bench/bench_onnx_llm.py --skip-torch     # the genai builds only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import sys
from pathlib import Path
method, merged, out = sys.argv[1:4]
if method == "torch":
    from neuroada_tools.export.onnx_export import export_onnx
    export_onnx(Path(merged), Path(out), with_past=True)
else:
    from neuroada_tools.export.genai_build import build_genai
    build_genai(Path(merged), Path(out), precision=method.split("-")[1], provider="cpu")
"""

PROMPT = "Explain in two sentences why the sky is blue."


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def sidecars(model: Path, work: Path) -> tuple[Path, Path]:
    import torch

    from neuroada_tools.index.build import run_index
    from neuroada_tools.io.sidecar import DeltaSidecar, read_index, write_delta

    ip, dp = work / "k1.index.safetensors", work / "k1.delta.safetensors"
    if not dp.exists():
        run_index(model, 1, ip)
        index = read_index(ip)
        gen = torch.Generator().manual_seed(0)
        deltas = {n: 0.01 * torch.randn(i.shape, generator=gen) for n, i in index.indices.items()}
        write_delta(dp, DeltaSidecar(index_digest=index.digest, deltas=deltas, task="causal-lm"))
    return ip, dp


def export(method: str, merged: Path, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, method, str(merged), str(out)], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if p.returncode != 0:
        raise SystemExit(f"{method} export failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def open_form(method: str, out: Path):
    from neuroada_tools.generate.sources import open_onnx

    return open_onnx(out, with_past=method == "torch")


def our_loop(source, prompt_ids: list[int], new_tokens: int) -> tuple[float, list[int]]:
    """Seconds and tokens of ``generate``'s greedy loop on ``source``."""
    from neuroada_tools.generate.decode import generate_ids

    t0 = time.perf_counter()
    g = generate_ids(source.new_session(), [prompt_ids], new_tokens, eos_ids=[], vocab=source.vocab)
    dt = time.perf_counter() - t0
    assert len(g[0].token_ids) == new_tokens
    return dt, g[0].token_ids


def agreement(ref: list[int], other: list[int]) -> float:
    """Share of ``ref``'s tokens ``other`` reproduces before the first difference."""
    same = next((i for i, (a, b) in enumerate(zip(ref, other)) if a != b), min(len(ref), len(other)))
    return same / len(ref)


def og_native_seconds(model, prompt_ids: list[int], new_tokens: int) -> float:
    import numpy as np
    import onnxruntime_genai as og

    t0 = time.perf_counter()
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + new_tokens, do_sample=False, min_length=0)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray([prompt_ids], dtype=np.int32))
    made = 0
    while made < new_tokens and not gen.is_done():
        gen.generate_next_token()
        made += 1
    return (time.perf_counter() - t0) * new_tokens / max(made, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--index", type=Path, default=None)
    ap.add_argument("--delta", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=ROOT / ".bench" / "onnx_llm")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args()

    from neuroada_tools.export.merge import merge_to_folder
    from neuroada_tools.generate.genai import load_model
    from neuroada_tools.hf import load_tokenizer
    from neuroada_tools.hf.gguf import smollm2_folder

    args.work.mkdir(parents=True, exist_ok=True)
    model = args.model or smollm2_folder()
    ip, dp = (args.index, args.delta) if args.delta else sidecars(model, args.work)
    merged = args.work / "merged"
    shutil.rmtree(merged, ignore_errors=True)
    t0 = time.perf_counter()
    merge_to_folder(model, ip, dp, merged)
    merge_s = time.perf_counter() - t0
    print(f"merged {model} in {merge_s:.1f}s ({folder_bytes(merged) / 1e6:.0f} MB)", flush=True)

    methods = (["torch"] if not args.skip_torch else []) + ["genai-fp32", "genai-int4"]
    rows: dict[str, dict] = {}
    for m in methods:
        out = args.work / m
        rows[m] = {"export_s": export(m, merged, out), "disk_bytes": folder_bytes(out),
                   "files": sorted(f.name for f in out.iterdir())}
        print(f"{m}: export {rows[m]['export_s']:.1f}s, {rows[m]['disk_bytes'] / 1e6:.0f} MB {rows[m]['files']}",
              flush=True)

    tok = load_tokenizer(merged)
    prompt_ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)
    prompt_ids = list(prompt_ids["input_ids"] if isinstance(prompt_ids, dict) else prompt_ids)
    forms = {m: open_form(m, args.work / m) for m in methods}
    natives = {m: load_model(args.work / m) for m in methods if m.startswith("genai")}
    for m in methods:  # warm-up
        our_loop(forms[m], prompt_ids, 2)
    times: dict[str, list[float]] = {m: [] for m in methods}
    native: dict[str, list[float]] = {m: [] for m in natives}
    tokens: dict[str, list[int]] = {}
    for rep in range(args.reps):
        order = methods[rep % len(methods):] + methods[: rep % len(methods)]
        for m in order:
            dt, tokens[m] = our_loop(forms[m], prompt_ids, args.new_tokens)
            times[m].append(dt)
            if m in natives:
                native[m].append(og_native_seconds(natives[m], prompt_ids, args.new_tokens))
    for m in methods:
        rows[m]["tok_s"] = args.new_tokens / statistics.median(times[m])
        rows[m]["agreement"] = agreement(tokens[methods[0]], tokens[m])  # with the first method's greedy tokens
        if m in native:
            rows[m]["og_native_tok_s"] = args.new_tokens / statistics.median(native[m])

    ref = rows.get("torch")
    print(f"\nSmolLM2-135M k=1 delta, prompt {len(prompt_ids)} tokens, {args.new_tokens} new tokens greedy, batch 1, "
          f"{args.reps} reps (median); ratios vs torch")
    print(f"| method | export s | disk MB | tokens/s (generate loop) | og native tokens/s | export vs torch "
          f"| disk vs torch | tokens/s vs torch | greedy tokens as {methods[0]} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in methods:
        r = rows[m]
        ratios = ("| " + " | ".join(f"{r[k] / ref[k]:.2f}x" for k in ("export_s", "disk_bytes", "tok_s"))) if ref else \
            "| - | - | -"
        nat = f"{r['og_native_tok_s']:.1f}" if "og_native_tok_s" in r else "-"
        print(f"| {m} | {r['export_s']:.1f} | {r['disk_bytes'] / 1e6:.0f} | {r['tok_s']:.1f} | {nat} {ratios} "
              f"| {100 * r['agreement']:.0f}% |")
    if args.json:
        args.json.write_text(json.dumps({"merge_s": merge_s, "prompt_tokens": len(prompt_ids), "rows": rows},
                                        indent=2))


if __name__ == "__main__":
    main()
