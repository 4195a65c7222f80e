"""GPU benchmark of the NeuroAda bypass: step time and peak memory against a frozen base, LoRA and
the dense-gradient ways of training the same sparse entries.

Run on a CUDA machine (bf16 base weights, fp32 deltas, as NeuroAda trains):

    python bench/bench_gpu.py                 # full, a few minutes on one H100/H200
    python bench/bench_gpu.py --quick         # smoke run (also works on CPU: --device cpu)

Measured side by side in one process, same inputs, methods interleaved, median of timed reps
(CUDA events), peak memory = ``torch.cuda.max_memory_allocated`` over one step minus what was
allocated before it:

1. One layer, forward + backward, x of T tokens (requires grad, as inside a network):
   frozen base; NeuroAda fused (``bypass.attach``); the authors' formulation
   ``linear(x, W.flatten().scatter_add(pos, delta))``; a mask-based selective update (W trainable,
   dense gradient, then masked); LoRA r=8.
2. A whole training step (forward, backward, AdamW) of a Llama (hidden 2048, 8 layers, seq 1024,
   batch 4) for: frozen base (gradient to the embedding output), NeuroAda k=20, LoRA r=8 (peft,
   same targets), the authors' scatter_add bypass, and mask-based selective fine-tuning (dense
   gradients and AdamW states on every target matrix, as NEUROADA.md describes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from neuroada_tools.index.criteria import select  # noqa: E402
from neuroada_tools.io.sidecar import IndexSidecar, TensorEntry  # noqa: E402
from neuroada_tools.train import bypass  # noqa: E402


def timer(device: torch.device):
    if device.type == "cuda":
        def run(fn, reps: int) -> list[float]:
            out = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                out.append(a.elapsed_time(b))
            return out
    else:
        import time

        def run(fn, reps: int) -> list[float]:
            out = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t) * 1e3)
            return out
    return run


def peak_mb(device: torch.device, fn, resident: bool = False):
    """Peak allocated during ``fn`` beyond what was allocated before (and, with ``resident``, that)."""
    if device.type != "cuda":
        return (float("nan"), float("nan")) if resident else float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - before) / 2**20
    return (before / 2**20, extra) if resident else extra


def index_for(named: dict[str, torch.Tensor], k: int) -> IndexSidecar:
    idx = {n: select(w.detach().float().cpu(), k) for n, w in named.items()}
    ent = {n: TensorEntry(tuple(w.shape), "out_in", "BF16", "0" * 64) for n, w in named.items()}
    return IndexSidecar(k=k, criterion="magnitude", indices=idx, entries=ent)


# ------------------------------------------------------------------ one layer


def layer_bench(device, dtype, d_out, d_in, T, k, reps, run) -> list[tuple[str, float, float]]:
    g = torch.Generator(device="cpu").manual_seed(0)
    w0 = (torch.randn(d_out, d_in, generator=g) * 0.02).to(device, dtype)
    x = torch.randn(T, d_in, generator=g).to(device, dtype).requires_grad_(True)
    gy = torch.randn(T, d_out, generator=g).to(device, dtype)

    frozen = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype)
    frozen.weight.data.copy_(w0)
    frozen.weight.requires_grad_(False)

    neuro = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype)
    neuro.weight.data.copy_(w0)
    holder = nn.Module()
    holder.lin = neuro
    bypass.attach(holder, index_for({"lin.weight": w0}, k))

    idx = select(w0.float().cpu(), k).to(device).long()
    flat = (torch.arange(d_out, device=device)[:, None] * d_in + idx).flatten()
    delta_a = torch.zeros(d_out * k, device=device, dtype=torch.float32, requires_grad=True)

    def authors():
        w = w0.flatten().scatter_add(0, flat, delta_a.to(dtype)).view_as(w0)
        F.linear(x, w).backward(gy)

    mask = torch.zeros(d_out, d_in, device=device, dtype=torch.bool)
    mask.view(-1)[flat] = True
    w_dense = w0.clone().requires_grad_(True)

    def masked():
        F.linear(x, w_dense).backward(gy)
        w_dense.grad.mul_(mask)
        w_dense.grad = None

    r = 8
    A = (torch.randn(r, d_in, generator=g) * 0.01).to(device, torch.float32).requires_grad_(True)
    B = torch.zeros(d_out, r, device=device, dtype=torch.float32, requires_grad=True)

    def lora():
        y = F.linear(x, w0) + F.linear(F.linear(x, A.to(dtype)), B.to(dtype))
        y.backward(gy)

    fns = {
        "frozen": lambda: frozen(x).backward(gy),
        "neuroada": lambda: holder.lin(x).backward(gy),
        "authors scatter_add": authors,
        "mask-based dense grad": masked,
        "lora r=8": lora,
    }
    for fn in fns.values():  # warm up
        fn()
    times = {n: [] for n in fns}
    for _ in range(reps):
        for n, fn in fns.items():
            times[n] += run(fn, 1)
    mem = {n: peak_mb(device, fn) for n, fn in fns.items()}
    base = statistics.median(times["frozen"])
    return [(n, statistics.median(t) / base, mem[n]) for n, t in times.items()]


# ------------------------------------------------------------------ whole step


def build_llama(device, dtype, hidden, layers, inter):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, vocab_size=32000,
                      max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        m = LlamaForCausalLM(cfg).to(dtype)
    return m


TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def step_bench(device, dtype, hidden, layers, inter, seq, batch, k, reps, run) -> list[tuple[str, float, tuple, int]]:
    ids = torch.randint(0, 32000, (batch, seq), device=device)
    results = []
    for method in ("frozen", "neuroada", "lora r=8", "authors scatter_add", "mask-based dense grad"):
        model = build_llama(device, dtype, hidden, layers, inter)
        model.requires_grad_(False)
        params: list[torch.Tensor] = []
        emb_hook = None
        if method == "frozen":
            emb_hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        elif method == "neuroada":
            named = {n: p for n, p in model.named_parameters() if n.endswith(".weight") and n.split(".")[-2] in TARGETS}
            bypass.attach(model, index_for(named, k))
            params = [p for _, p in bypass.trainable_parameters(model)]
        elif method == "lora r=8":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGETS)))
            params = [p for p in model.parameters() if p.requires_grad]
        elif method == "authors scatter_add":
            params = _authors_patch(model, k)
        else:  # mask-based: dense trainable weights + masks
            params = _masked_patch(model, k)
        opt = torch.optim.AdamW(params, lr=1e-4) if params else None

        def step():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if opt:
                opt.step()
                opt.zero_grad(set_to_none=True)

        step()
        step()
        times = []
        for _ in range(reps):
            times += run(step, 1)
        mem = peak_mb(device, step, resident=True)
        n_train = sum(p.numel() for p in params) if method != "mask-based dense grad" else sum(
            int(m.sum()) for m in _MASKS)
        results.append((method, statistics.median(times), mem, n_train))
        if emb_hook:
            emb_hook.remove()
        model = opt = params = None  # free before the next method (the closure above is done with them)
        _MASKS.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _authors_patch(model, k) -> list[torch.Tensor]:
    """The authors' bypass: materialise W + scatter(delta) in every forward."""
    params = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.split(".")[-1] in TARGETS:
            w0 = mod.weight
            idx = select(w0.detach().float().cpu(), k).to(w0.device).long()
            flat = (torch.arange(w0.shape[0], device=w0.device)[:, None] * w0.shape[1] + idx).flatten()
            delta = nn.Parameter(torch.zeros(flat.numel(), device=w0.device, dtype=w0.dtype))
            mod.register_parameter("authors_delta", delta)
            params.append(delta)

            def fwd(x, mod=mod, flat=flat):
                w = mod.weight.flatten().scatter_add(0, flat, mod.authors_delta).view_as(mod.weight)
                return F.linear(x, w, mod.bias)

            mod.forward = fwd
    return params


_MASKS: list[torch.Tensor] = []


def _masked_patch(model, k) -> list[torch.Tensor]:
    """Mask-based selective fine-tuning: dense grads and optimizer states, masked to the selection."""
    params = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.split(".")[-1] in TARGETS:
            w = mod.weight
            idx = select(w.detach().float().cpu(), k).to(w.device).long()
            mask = torch.zeros_like(w, dtype=torch.bool)
            mask.scatter_(1, idx, True)
            _MASKS.append(mask)
            w.requires_grad_(True)
            w.register_hook(lambda g, mask=mask: g * mask)
            params.append(w)
    return params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    device = torch.device(a.device)
    dtype = torch.bfloat16
    run = timer(device)
    lines = []
    if device.type == "cuda":
        lines.append(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 base weights, fp32 "
            "deltas")
    else:
        lines.append(f"device: cpu ({torch.get_num_threads()} threads), torch {torch.__version__}")
    shapes = [(4096, 4096, 4096), (11008, 4096, 4096), (4096, 11008, 4096)] if not a.quick else [(256, 128, 64)]
    reps = 30 if not a.quick else 3
    lines += [
        "",
        "### One layer, forward + backward (time relative to frozen; extra peak memory in MiB)",
        "",
        "| d_out x d_in, T | k | frozen | neuroada | authors scatter_add | mask-based dense grad | lora r=8 |",
        "|---|---|---|---|---|---|---|",
    ]
    for d_out, d_in, T in shapes:
        for k in (1, 20):
            res = layer_bench(device, dtype, d_out, d_in, T, k, reps, run)
            cells = " | ".join(f"{ratio:.2f}x ({mem:.0f})" for _, ratio, mem in res)
            lines.append(f"| {d_out}x{d_in}, T={T} | {k} | {cells} |")
            print(lines[-1], flush=True)
    hidden, layers, inter, seq, batch = (2048, 8, 5632, 1024, 4) if not a.quick else (256, 2, 512, 32, 2)
    lines += [
        "",
        f"### Whole training step: Llama hidden {hidden}, {layers} layers, seq {seq}, batch {batch}, k=20",
        "",
        "| method | step ms | vs frozen | resident between steps (MiB) | extra peak in a step (MiB) | total peak "
            "(MiB) | trainable |",
        "|---|---|---|---|---|---|---|",
    ]
    res = step_bench(device, dtype, hidden, layers, inter, seq, batch, 20, reps if not a.quick else 2, run)
    base = res[0][1]
    for method, ms, (resident, extra), n in res:
        lines.append(
            f"| {method} | {ms:.1f} | {ms / base:.2f}x | {resident:.0f} | {extra:.0f} | {resident + extra:.0f} | "
                f"{n:,} |"
        )
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if a.out:
        a.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
