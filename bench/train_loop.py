"""``bench_bypass.py --train-loop``: the CLI's own loop (``train()``) against a frozen forward+backward.

The setting of issue 9: a 50M Llama (hidden 1024, 4 layers, intermediate 2816, vocab 32000,
random fp32 weights, written to a folder with a small BPE tokenizer), k=20, batches of 4
Alpaca-prompt examples of about 330 tokens. The marginal step of ``train()`` is

    (loop seconds of an S2-step run - loop seconds of an S1-step run) / (S2 - S1)

(default S1 = 5, S2 = 45: start-up, the first steps' allocations and the final checkpoint cancel
out), and the frozen model's marginal step is the same difference over plain forward+backward
passes of the same batches with every weight frozen and the gradient flowing to the embedding
output. Repetitions are interleaved (train S1, train S2, frozen, in a rotating order) and the
ratio is reported as the median with a bootstrap 90% interval over repetitions. Target: <= 1.10x.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

PROMPT_WORDS = ("sparse neuron delta weight train model row column index merge export the a of to in "
                "selection gradient magnitude adapter").split()


def build(folder: Path, quick: bool) -> dict[str, Path]:
    """Model folder, k=20 index and an instruction data file of ~330-token examples (cached)."""
    from _common import build_llama_50m

    from neuroada_tools.index.build import run_index

    name = "llama-quick" if quick else "llama-50m"
    model_dir = build_llama_50m(folder / name, layers=2 if quick else 4, vocab=8000 if quick else 32000)
    index = folder / f"{name}.k20.index.safetensors"
    if not index.exists():
        run_index(model_dir, 20, index)
    data = folder / f"{name}.alpaca.json"
    if not data.exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        records = []
        for i in range(64):
            words = [PROMPT_WORDS[(i * 5 + j * 3) % len(PROMPT_WORDS)] for j in range(400)]
            n = 40
            while len(tok(" ".join(words[:n]))["input_ids"]) < 250:
                n += 10
            records.append({"instruction": " ".join(words[:n]), "input": "", "output": " ".join(words[n : n + 40])})
        data.write_text(json.dumps(records))
    return {"model": model_dir, "index": index, "data": data}


def _train_seconds(inputs: dict[str, Path], steps: int, out: Path, max_length: int) -> float:
    from neuroada_tools.train.loop import TrainConfig, train

    s = train(TrainConfig(model=inputs["model"], index=inputs["index"], data=inputs["data"], output=out,
                          batch_size=4, max_length=max_length, max_steps=steps, lr=1e-4, warmup_ratio=0.0,
                          device="cpu", force=True))
    return s.seconds


def _frozen(inputs: dict[str, Path], max_length: int):
    """``run(n)``: seconds of n frozen forward+backward passes over the loop's first n batches."""
    from neuroada_tools.hf import load_model, task_config
    from neuroada_tools.train.config import TrainConfig
    from neuroada_tools.train.data import collate
    from neuroada_tools.train.setup import prepare_data
    from neuroada_tools.train.steps import compute_loss, epoch_batches

    cfg = TrainConfig(model=inputs["model"], index=inputs["index"], data=inputs["data"], output=Path("unused"),
                      batch_size=4, max_length=max_length)
    prep = prepare_data(cfg, "causal-lm", inputs["model"])
    model = load_model(inputs["model"], "causal-lm", config=task_config(inputs["model"], "causal-lm"))
    model.requires_grad_(False)
    model.config.use_cache = False
    embed = model.get_input_embeddings()
    embed.register_forward_hook(lambda m, i, o: o.detach().requires_grad_())  # grad reaches the embedding output
    batches = [collate([prep.examples[i] for i in b], prep.pad_id)
               for e in range(4) for b in epoch_batches(len(prep.examples), 4, 0, e)]
    model.train()

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for b in batches[:n]:
            loss, _ = compute_loss(model, b, "causal-lm", torch.device("cpu"))
            loss.backward()
        return time.perf_counter() - t0

    return run


def bench_train_loop(steps: tuple[int, int], reps: int, quick: bool, folder: Path | None = None) -> str:
    """Run the measurement; return the markdown table and verdict."""
    from bench_bypass import median_interval, verdict  # the benchmark's own statistics

    folder = folder or Path(tempfile.gettempdir()) / "neuroada-bench-train-loop"
    folder.mkdir(parents=True, exist_ok=True)
    inputs = build(folder, quick)
    max_length = 384
    out = folder / "loop.delta.safetensors"
    frozen = _frozen(inputs, max_length)
    s1, s2 = steps
    _train_seconds(inputs, s1, out, max_length)  # warm-up: kernels built, files cached
    frozen(s1)
    trains, froz, ratios = [], [], []
    for r in range(reps):
        jobs = [("t1", lambda: _train_seconds(inputs, s1, out, max_length)),
                ("t2", lambda: _train_seconds(inputs, s2, out, max_length)),
                ("f", lambda: (frozen(s2), frozen(s1)))]
        jobs = jobs[r % 3:] + jobs[: r % 3]
        got = {name: fn() for name, fn in jobs}
        train_step = (got["t2"] - got["t1"]) / (s2 - s1)
        frozen_step = (got["f"][0] - got["f"][1]) / (s2 - s1)
        trains.append(train_step)
        froz.append(frozen_step)
        ratios.append(train_step / frozen_step)
    med = statistics.median(ratios)
    ci = median_interval(ratios)
    shape = "2 layers, vocab 8000 (--quick)" if quick else "4 layers, vocab 32000"
    lines = [
        f"### train() marginal step vs frozen forward+backward: Llama hidden 1024, {shape}, intermediate 2816, "
        f"batch 4 x ~330-token Alpaca prompts, k=20, steps {s1} and {s2}, {reps} interleaved reps",
        "",
        "| rep | train() step s | frozen fwd+bwd s | ratio |",
        "|---|---|---|---|",
    ]
    lines += [f"| {i} | {t:.3f} | {f:.3f} | {r:.3f} |" for i, (t, f, r) in enumerate(zip(trains, froz, ratios))]
    lines += ["", f"Median ratio {med:.3f}x (90% interval {ci[0]:.3f}-{ci[1]:.3f}); target <= 1.10x: "
              f"{verdict(med, ci, 1.10)}"]
    return "\n".join(lines) + "\n"
