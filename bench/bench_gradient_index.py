"""Peak memory of `neuroada-tools index --criterion gradient` against the bound it documents.

Builds, in a temporary folder (or ``--dir``), a random Llama with transformers (hidden 1024, 4
layers, intermediate 2816, vocab 32000: 51 M block parameters, 117 M in all, saved fp32), a
byte-level BPE tokenizer trained here on generated text, and a JSONL file of generated
``{"text": ...}`` records; then runs the gradient index through the CLI in a fresh subprocess
(so its peak RSS, ``VmHWM``, is its own) and prints, in MiB:

- the subprocess's peak RSS, its RSS after importing torch and transformers, and the difference;
- the bound of ``neuroada_tools/index/gradient.py`` without the activations: the fp32 model + one
  fp32 accumulator per adapted matrix + one transient gradient (the largest adapted matrix);
- what is left over (activations of one batch, of which the fp32 logits and their gradient,
  ``batch x length x vocab x 4`` bytes each, are the largest known part; the allocator; the
  safetensors loader's pages), and the ratios of the peak to the model and to the bound.

    python bench/bench_gradient_index.py                       # 32 examples, length 128: ~1-2 min on 2 cores
    python bench/bench_gradient_index.py --calibration-examples 64 --max-length 256 --dir /tmp/gbench
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20

CHILD = r"""
import json, sys
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
import torch, transformers
torch.set_num_threads(int(sys.argv[1]))
from neuroada_tools.cli import main
base = hwm()
try:
    main(sys.argv[2:], standalone_mode=False)
finally:
    print(json.dumps({"peak_rss": hwm(), "rss_after_imports": base}))
"""

WORDS = (
    "the a an of to in and on for with by from model data weight sparse neuron row column gradient loss token "
    "batch layer train small large fast slow river town sea fish bread wind cold warm blue green red quick "
    "brown fox jumps over lazy dog time once upon there was little people went every morning came home "
    "evening children played sand old men told stories storms ships baker sold window faced harbour winter "
    "summer water calm grey waves question answer capital france paris two three five colours house german"
).split()


def build(folder: Path, records: int, hidden: int, layers: int, intermediate: int, vocab: int) -> None:
    """The random Llama (fp32 safetensors), its tokenizer and ``data.jsonl`` (seeded: the same every run)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(80, 240))).capitalize() + "."
             for _ in range(records)]
    (folder / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    model_dir = folder / "model"
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>").save_pretrained(
        model_dir)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate, vocab_size=vocab,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(model_dir, safe_serialization=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibration-examples", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("-k", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", type=Path, help="work folder (kept); default: a temporary one, removed")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="neuroada-gradbench-") as tmp:
        folder = a.dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if not (folder / "model" / "config.json").exists():
            build(folder, max(a.calibration_examples, 8), a.hidden, a.layers, a.intermediate, a.vocab)
        built = time.perf_counter() - t0
        out = folder / "grad.index.safetensors"
        args = ["index", str(folder / "model"), "-k", str(a.k), "--criterion", "gradient", "--data",
                str(folder / "data.jsonl"), "--calibration-examples", str(a.calibration_examples), "--batch-size",
                str(a.batch_size), "--max-length", str(a.max_length), "--device", "cpu", "--json", "-q", "--force",
                "-o", str(out)]
        t0 = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        p = subprocess.run([sys.executable, "-c", CHILD, str(a.threads), *args], capture_output=True, text=True,
                           cwd=ROOT, env=env)
        ran = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"the gradient index failed:\n{p.stderr}")
        lines = p.stdout.strip().splitlines()
        rss = json.loads(lines[-1])
        summary = json.loads("\n".join(lines[:-1]))
        report(a, folder, rss, summary, built, ran)


def report(a, folder: Path, rss: dict, summary: dict, built: float, ran: float) -> None:
    from neuroada_tools.index.targets import resolve_targets
    from neuroada_tools.io.checkpoint import open_checkpoint

    ckpt = open_checkpoint(folder / "model")
    targets = resolve_targets(ckpt)
    model_bytes = 4 * ckpt.total_parameters  # loaded in fp32
    acc_bytes = 4 * sum(t.d_out * t.d_in for t in targets)
    transient = 4 * max(t.d_out * t.d_in for t in targets)
    bound = model_bytes + acc_bytes + transient
    peak, base = rss["peak_rss"], rss["rss_after_imports"]
    used = peak - base
    tokens = a.batch_size * a.max_length
    logits = tokens * a.vocab * 4
    c = summary["calibration"]
    lines = [
        f"random Llama: hidden {a.hidden}, {a.layers} layers, intermediate {a.intermediate}, vocab {a.vocab}: "
        f"{ckpt.total_parameters / 1e6:.1f} M parameters ({sum(t.d_out * t.d_in for t in targets) / 1e6:.1f} M in "
        f"{len(targets)} adapted matrices), k={a.k}",
        f"calibration: {c['examples']} examples, batch {c['batch_size']}, max length {c['max_length']}, "
        f"{c['target_count']} target tokens, mean loss {c['mean_loss']:.3f}; {a.threads} threads",
        f"time: build {built:.1f} s, index subprocess {ran:.1f} s (its own count: {summary['seconds']:.1f} s)",
        "",
        "| quantity | MiB |",
        "|---|---|",
        f"| peak RSS of the index subprocess | {peak / MiB:.0f} |",
        f"| RSS after importing torch + transformers | {base / MiB:.0f} |",
        f"| peak over imports | {used / MiB:.0f} |",
        f"| model, fp32 | {model_bytes / MiB:.0f} |",
        f"| accumulators, fp32 (one per adapted matrix) | {acc_bytes / MiB:.0f} |",
        f"| one transient gradient (largest adapted matrix) | {transient / MiB:.0f} |",
        f"| bound without activations (sum of the three) | {bound / MiB:.0f} |",
        f"| left over: activations, allocator, loader | {(used - bound) / MiB:.0f} |",
        f"| of which fp32 logits of one batch ({tokens} tokens x {a.vocab}), one copy | {logits / MiB:.0f} |",
        "",
        f"peak over imports / fp32 model: {used / model_bytes:.2f}x; / bound without activations: "
        f"{used / bound:.2f}x",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
