"""Cost of the NeuroAda bypass against a frozen base, the authors' scatter_add, Super-Tuning and LoRA.

Run: ``python bench/bench_bypass.py [--quick] [--out FILE]``; ``--train-loop [--loop-steps 5,45]``
times the CLI's own loop instead (``bench/train_loop.py``: ``train()``'s marginal step on the 50M
Llama against a frozen forward+backward). fp32, CPU, 2 threads. Everything a
table compares is measured in one process, on the same inputs, with repetitions interleaved
(the order rotates every repetition); ratios are medians of per-repetition ratios to the frozen
base of the same repetition, so a noisy neighbour slows every method of that repetition alike.

1. One layer, forward + backward, ``x`` requiring grad (as inside a network):
   frozen base; NeuroAda fused (in-place weight + SDDMM; one delta entry changes between
   repetitions, untimed, as an optimizer step would, so every timed forward pays the refresh
   of the weight; the optimizer is not timed for LoRA either); the authors' formulation
   ``linear(x, W.flatten().scatter_add(0, flat_pos, delta.flatten()).view_as(W))``; PEFT
   Super-Tuning at the same trainable count; a hand-written LoRA with r=8 and with r matched to
   NeuroAda's trainable count. Also the bytes each keeps for backward (``saved_tensors_hooks``,
   unique storages, parameters' own storages not counted: they are alive anyway).
2. A whole training step of a Llama (hidden 1024, 4 layers, seq 256, batch 1, k=20): NeuroAda
   (forward, backward, fused AdamW step) vs the frozen base (same model, no trainable weights, gradient
   flowing to the embedding output) vs LoRA r=8 (peft, fused AdamW). The embedding output requires grad
   in all three so each computes the same input gradients.
3. Peak RSS of that step: each configuration in its own fresh subprocess, with glibc's mmap
   threshold fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``) so the peak does not depend on
   allocation history; after building the model the peak is reset (``/proc/self/clear_refs``),
   two steps run, and ``VmHWM`` is read.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from neuroada_tools.kernels.native import shorten_openmp_spin  # noqa: E402

shorten_openmp_spin()  # as the CLI does, before torch is imported; applies to every method alike

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from neuroada_tools.index.criteria import select  # noqa: E402
from neuroada_tools.io.sidecar import IndexSidecar, TensorEntry  # noqa: E402
from neuroada_tools.train.bypass import attach  # noqa: E402

torch.set_num_threads(2)
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' gradient-checkpointing renames
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------- helpers


def index_for(model: nn.Module, k: int, targets=None) -> IndexSidecar:
    indices, entries = {}, {}
    for mname, m in model.named_modules():
        if not isinstance(m, nn.Linear) or (targets and mname.rpartition(".")[2] not in targets):
            continue
        w = m.weight.detach()
        indices[f"{mname}.weight"] = select(w, k)
        entries[f"{mname}.weight"] = TensorEntry(tuple(w.shape), "out_in", "F32", "0" * 64)
    return IndexSidecar(k=k, criterion="magnitude", indices=indices, entries=entries)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(methods: dict, reps: int, base: str) -> dict[str, tuple]:
    """{name: (median s, median per-round ratio to ``base``, ratio of best times, [times])}.

    A method's ``prepare`` attribute, if any, runs before each of its repetitions, untimed."""
    names = list(methods)
    for n in names:  # warm-up
        getattr(methods[n], "prepare", lambda: None)()
        methods[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            gc.collect()
            getattr(methods[n], "prepare", lambda: None)()
            times[n].append(timed(methods[n]))
    out = {}
    for n in names:
        ratios = [t / b for t, b in zip(times[n], times[base])]
        out[n] = (statistics.median(times[n]), statistics.median(ratios), min(times[n]) / min(times[base]), times[n])
    return out


def median_interval(values: list[float], level: float = 0.9, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of the median of ``values`` (resampled with replacement, seeded).

    Example: ``median_interval([1.0, 1.0, 1.0])`` is ``(1.0, 1.0)``; with more spread values the
    interval widens, so a ratio whose interval straddles a target is a measurement at the line,
    not a result either way."""
    import random

    rng = random.Random(seed)
    n = len(values)
    meds = sorted(statistics.median(rng.choices(values, k=n)) for _ in range(draws))
    lo = meds[int((1 - level) / 2 * draws)]
    hi = meds[min(draws - 1, int((1 + level) / 2 * draws))]
    return lo, hi


def verdict(median: float, interval: tuple[float, float], limit: float) -> str:
    """"met" (median within the limit), "MISSED" (the whole interval over it), or "at the line"."""
    if median <= limit:
        return "met"
    return "MISSED" if interval[0] > limit else "at the line (median over, 90% interval reaches it)"


def saved_bytes(step, exclude: list[torch.Tensor]) -> int:
    """Bytes of unique storages autograd saves during one forward (excluding ``exclude``'s)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step(forward_only=True)
    del out
    return sum(seen.values())


# ---------------------------------------------------------------- 1. one layer


def layer_methods(d_in: int, d_out: int, T: int, k: int, seed: int = 0):
    """Return ({name: step(forward_only=False)}, {name: params to exclude}, {name: trainable})."""
    from peft import SupertuningConfig
    from peft.tuners.supertuning.layer import Linear as SupertuningLinear

    g_ = torch.Generator().manual_seed(seed)
    W = nn.Parameter(torch.randn(d_out, d_in, generator=g_) * d_in**-0.5, requires_grad=False)
    x = torch.randn(T, d_in, generator=g_).requires_grad_()
    g = torch.randn(T, d_out, generator=g_)
    idx = select(W.detach(), k)

    def run(f):
        def step(forward_only=False):
            x.grad = None
            y = f()
            if forward_only:
                return y
            y.backward(g)
        return step

    methods, params, trainable = {}, {}, {}
    methods["frozen"] = run(lambda: F.linear(x, W))
    params["frozen"], trainable["frozen"] = [W], 0

    # NeuroAda fused on its own copy of W (the bypass writes into it)
    lin = nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        lin.weight.copy_(W)
    net = nn.Sequential(lin)
    index = IndexSidecar(k=k, criterion="magnitude", indices={"0.weight": idx},
                         entries={"0.weight": TensorEntry((d_out, d_in), "out_in", "F32", "0" * 64)})
    (delta,) = attach(net, index).values()
    with torch.no_grad():
        delta.normal_(std=1e-3)

    def optimizer_step():  # between repetitions, untimed: a changed delta, so the next forward refreshes W
        with torch.no_grad():
            delta[0, 0] += 1e-7

    def na():
        delta.grad = None
        return net(x)
    methods["neuroada"] = run(na)
    methods["neuroada"].prepare = optimizer_step
    params["neuroada"], trainable["neuroada"] = [lin.weight, delta], delta.numel()

    # the authors' scatter_add formulation
    flat_pos = (torch.arange(d_out)[:, None] * d_in + idx.long()).flatten()
    sdelta = nn.Parameter(torch.zeros(d_out, k))

    def sa():
        sdelta.grad = None
        return F.linear(x, W.flatten().scatter_add(0, flat_pos, sdelta.flatten()).view_as(W))
    methods["scatter_add"] = run(sa)
    params["scatter_add"], trainable["scatter_add"] = [W, sdelta], sdelta.numel()

    # PEFT Super-Tuning (global magnitude top-k over the matrix) at the same trainable count
    st_base = nn.Linear(d_in, d_out, bias=False)
    st_base.weight = W
    numel = d_in * d_out
    st = SupertuningLinear(st_base, "default", SupertuningConfig(sparsity=1 - (d_out * k + 0.5) / numel))
    st_vals = st.supertuning_values["default"]

    def stf():
        st_vals.grad = None
        return st(x)
    methods["supertuning"] = run(stf)
    params["supertuning"], trainable["supertuning"] = [W, st_vals], st_vals.numel()

    # hand-written LoRA (no dropout, fp32): y = x W^T + s * (x A^T) B^T
    def lora(r):
        A = nn.Parameter(torch.randn(r, d_in, generator=g_) * d_in**-0.5)
        B = nn.Parameter(torch.randn(d_out, r, generator=g_) * 1e-3)
        s = 2.0

        def f():
            A.grad = B.grad = None
            return F.linear(x, W) + F.linear(F.linear(x, A), B) * s
        return run(f), [W, A, B], A.numel() + B.numel()

    r_match = max(1, round(k * d_out / (d_in + d_out)))
    methods["lora8"], params["lora8"], trainable["lora8"] = lora(8)
    methods["lora_match"], params["lora_match"], trainable["lora_match"] = lora(r_match)
    return methods, params, trainable, r_match


def bench_layers(cases, ks, reps: int) -> list[dict]:
    rows = []
    for d_in, d_out, T in cases:
        for k in ks:
            methods, params, trainable, r_match = layer_methods(d_in, d_out, T, k)
            saved = {n: saved_bytes(methods[n], params[n]) for n in methods}
            res = interleaved(methods, reps, "frozen")
            rows.append(dict(d_in=d_in, d_out=d_out, T=T, k=k, r_match=r_match, res=res, saved=saved,
                             trainable=trainable))
            print(f"layer {d_in}->{d_out} T={T} k={k}: "
                  + ", ".join(f"{n} {v[1]:.3f}x" for n, v in res.items()), file=sys.stderr)
            del methods, params
            gc.collect()
    return rows


# ---------------------------------------------------------------- 2. whole step


def build_llama(cfg_kw: dict, mode: str, k: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**cfg_kw)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.train()
    opt = None
    if mode == "frozen":
        for p in model.parameters():
            p.requires_grad_(False)
    elif mode == "neuroada":
        params = attach(model, index_for(model, k, LLAMA_TARGETS))
        opt = torch.optim.AdamW(params.values(), lr=1e-3, weight_decay=0.0, fused=True)
    elif mode == "lora8":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=list(LLAMA_TARGETS)))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0,
                                fused=True)
    else:
        raise ValueError(mode)
    model.enable_input_require_grads()  # same input gradients in all three configurations
    return model, opt


def make_step(model, opt, ids):
    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def bench_step(cfg_kw: dict, seq: int, k: int, reps: int) -> dict:
    ids = torch.randint(0, cfg_kw["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(1))
    steps, trainable = {}, {}
    for mode in ("frozen", "neuroada", "lora8"):
        model, opt = build_llama(cfg_kw, mode, k)
        steps[mode] = make_step(model, opt, ids)
        trainable[mode] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    res = interleaved(steps, reps, "frozen")
    print("step: " + ", ".join(f"{n} {v[1]:.3f}x" for n, v in res.items()), file=sys.stderr)
    return dict(res=res, trainable=trainable)


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


def rss_child(cfg_kw: dict, seq: int, k: int, mode: str) -> None:
    """Build, then reset the peak (``/proc/self/clear_refs``) so that building the model (whose
    initialisation peaks above a step) is not counted; run 2 steps; report the step peak."""
    import psutil

    ids = torch.randint(0, cfg_kw["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(1))
    model, opt = build_llama(cfg_kw, mode, k)
    gc.collect()
    before = psutil.Process().memory_info().rss
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        peak_of = _vm_hwm
    except OSError:  # no clear_refs: fall back to the whole-process peak
        peak_of = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # noqa: E731
    step = make_step(model, opt, ids)
    for _ in range(2):
        step()
    peak = peak_of()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(json.dumps(dict(mode=mode, rss_before=before, peak=peak, trainable=trainable)))


def bench_rss(cfg_kw: dict, seq: int, k: int) -> dict:
    out = {}
    for mode in ("frozen", "neuroada", "lora8"):
        cmd = [sys.executable, __file__, "--rss-child", mode, "--cfg", json.dumps(cfg_kw), "--seq", str(seq),
               "--k", str(k), "--threads", str(torch.get_num_threads())]
        # a fixed mmap threshold: glibc's adaptive one makes the peak depend on allocation history
        # (+-30 MB between identical runs); fixed, large blocks go back to the OS when freed and the
        # peak is what the step needs. Same setting for every configuration.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# ---------------------------------------------------------------- report


def mib(b: float) -> str:
    return f"{b / 2**20:.1f}"


def _na_over_lora(res) -> float:
    return statistics.median(_na_over_lora_all(res))


def _na_over_lora_all(res) -> list[float]:
    return [a / b for a, b in zip(res["neuroada"][3], res["lora_match"][3])]


def _na_ratios(res) -> list[float]:
    return [a / b for a, b in zip(res["neuroada"][3], res["frozen"][3])]


def report(layer_rows, step, rss, cfg_kw, seq, k, reps) -> str:
    L = []
    L.append(f"### One layer, forward + backward (fp32, CPU, {torch.get_num_threads()} threads, "
             f"{reps} interleaved reps)")
    L.append("Cells: median of per-repetition ratios to the frozen base (in brackets: best time / best "
             "frozen time). `NA/LoRA=`: median per-repetition NeuroAda time over LoRA at matched count. "
             "`NA 90%`: bootstrap 90% interval of the NeuroAda median ratio (how far the noise reaches).")
    L.append("")
    L.append("| d_in→d_out | T | k | frozen ms | NeuroAda | scatter_add (authors) | Super-Tuning | LoRA r=8 "
             "| LoRA r=match | NA/LoRA= | NA 90% |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in layer_rows:
        res = r["res"]
        na_l = _na_over_lora(res)
        lo, hi = median_interval(_na_ratios(res))
        c = {n: f"{v[1]:.3f} ({v[2]:.3f})" for n, v in res.items()}
        L.append(
            f"| {r['d_in']}→{r['d_out']} | {r['T']} | {r['k']} | {res['frozen'][0] * 1e3:.1f} | "
            f"{c['neuroada']} | {c['scatter_add']} | {c['supertuning']} | "
            f"{c['lora8']} | {c['lora_match']} r={r['r_match']} | {na_l:.3f} | {lo:.3f}–{hi:.3f} |"
        )
    L.append("")
    L.append("Saved for backward per layer, MiB (unique storages; the layer's own parameters not counted). "
             "Trainable counts: NeuroAda / Super-Tuning / LoRA r=match.")
    L.append("")
    L.append("| d_in→d_out | T | k | frozen | NeuroAda | scatter_add | Super-Tuning | LoRA r=8 | LoRA r=match "
             "| trainable NA / ST / LoRA= |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in layer_rows:
        s, t = r["saved"], r["trainable"]
        L.append(
            f"| {r['d_in']}→{r['d_out']} | {r['T']} | {r['k']} | {mib(s['frozen'])} | {mib(s['neuroada'])} | "
            f"{mib(s['scatter_add'])} | {mib(s['supertuning'])} | {mib(s['lora8'])} | {mib(s['lora_match'])} | "
            f"{t['neuroada']} / {t['supertuning']} / {t['lora_match']} |"
        )
    L.append("")
    L.append(f"### Whole training step: Llama hidden {cfg_kw['hidden_size']}, {cfg_kw['num_hidden_layers']} layers, "
             f"intermediate {cfg_kw['intermediate_size']}, vocab {cfg_kw['vocab_size']}, seq {seq}, batch 1, k={k}")
    L.append("")
    L.append("| config | trainable | step s (median) | vs frozen (best) | RSS before MiB | step peak RSS MiB "
             "| peak − frozen peak MiB |")
    L.append("|---|---|---|---|---|---|---|")
    labels = (("frozen", "frozen base"), ("neuroada", "NeuroAda fused + AdamW"), ("lora8", "LoRA r=8 (peft) + AdamW"))
    for mode, label in labels:
        sec, ratio, best, _ = step["res"][mode]
        pk = rss[mode]["peak"]
        L.append(f"| {label} | {step['trainable'][mode]} | {sec:.3f} | {ratio:.3f} ({best:.3f}) | "
                 f"{mib(rss[mode]['rss_before'])} | {mib(pk)} | {mib(pk - rss['frozen']['peak'])} |")
    L.append("")
    # targets
    worst = max(layer_rows, key=lambda r: r["res"]["neuroada"][1])
    worst_layer, worst_ci = worst["res"]["neuroada"][1], median_interval(_na_ratios(worst["res"]))
    worst_l = max(layer_rows, key=lambda r: _na_over_lora(r["res"]))
    worst_vs_lora, worst_l_ci = _na_over_lora(worst_l["res"]), median_interval(_na_over_lora_all(worst_l["res"]))
    shape = lambda r: f"{r['d_in']}→{r['d_out']} T={r['T']} k={r['k']}"  # noqa: E731
    step_ratio = step["res"]["neuroada"][1]
    n_tr = rss["neuroada"]["trainable"]
    allow = 0.05 * rss["frozen"]["peak"] + 16 * n_tr
    extra = rss["neuroada"]["peak"] - rss["frozen"]["peak"]
    ok = lambda c: "met" if c else "MISSED"  # noqa: E731
    L.append("Targets:")
    L.append(f"- one layer <= 1.05x frozen: worst {worst_layer:.3f}x ({shape(worst)}, 90% interval "
             f"{worst_ci[0]:.3f}–{worst_ci[1]:.3f}) — {verdict(worst_layer, worst_ci, 1.05)}")
    L.append(f"- one layer no slower than LoRA at matched parameters: worst {worst_vs_lora:.3f}x ({shape(worst_l)}, "
             f"90% interval {worst_l_ci[0]:.3f}–{worst_l_ci[1]:.3f}) — {verdict(worst_vs_lora, worst_l_ci, 1.0)}")
    L.append(f"- whole step <= 1.10x frozen: {step_ratio:.3f}x — {ok(step_ratio <= 1.10)}")
    L.append(f"- peak RSS over frozen <= 5% + 16 B/trainable ({mib(allow)} MiB for {n_tr} params): "
             f"{mib(extra)} MiB — {ok(extra <= allow)}")
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, few repetitions (about a minute)")
    ap.add_argument("--out", type=Path, help="also write the markdown table here")
    ap.add_argument("--reps", type=int, help="repetitions per measurement")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--train-loop", action="store_true",
                    help="time the CLI's own loop (train()) on the 50M Llama instead (bench/train_loop.py)")
    ap.add_argument("--loop-steps", default="5,45", help="--train-loop: the two run lengths (default 5,45)")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    ap.add_argument("--cfg", help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, default=256, help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, default=20, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(json.loads(args.cfg), args.seq, args.k, args.rss_child)
        return
    if args.train_loop:
        from train_loop import bench_train_loop

        s1, s2 = (int(v) for v in args.loop_steps.split(","))
        text = bench_train_loop((s1, s2), args.reps or 5, args.quick)
        print(text)
        if args.out:
            args.out.write_text(text)
        return

    cfg_kw = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                  num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    seq, k = 256, 20
    if args.quick:
        cases = [(1024, 1024, 256), (1024, 2816, 256)]
        reps = args.reps or 3
        cfg_kw.update(num_hidden_layers=2, vocab_size=8000)
        seq = 128
    else:
        cases = [(4096, 4096, 512), (4096, 11008, 512), (1024, 1024, 2048)]
        reps = args.reps or 7
    load0 = os.getloadavg()[0]
    layer_rows = bench_layers(cases, (1, 20), reps)
    step = bench_step(cfg_kw, seq, k, reps)
    rss = bench_rss(cfg_kw, seq, k)
    load = (load0, os.getloadavg()[0])
    text = report(layer_rows, step, rss, cfg_kw, seq, k, reps)
    text += (f"\n1-minute load average at start / end: {load[0]:.2f} / {load[1]:.2f} on {os.cpu_count()} CPUs "
             "(other jobs on the machine inflate every time, and memory-bound steps more than matmuls).\n")
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
