"""Shared pieces of the benchmarks: the LLaMA-7B-shaped checkpoint and child-process runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (11008, 4096),
    "mlp.up_proj": (11008, 4096),
    "mlp.down_proj": (4096, 11008),
}


def build_llama7b_shapes(folder: Path, layers: int) -> None:
    """A Llama checkpoint with LLaMA-7B shapes and random bf16 values (cached; ~0.47 GB per block + 0.5 GB)."""
    import torch

    from neuroada_tools.io.safetensors_file import StreamingWriter

    if (folder / "model.safetensors").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
        "num_hidden_layers": layers, "vocab_size": 32000, "rms_norm_eps": 1e-6, "dtype": "bfloat16",
        "tie_word_embeddings": False, "max_position_embeddings": 2048,
    }
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    entries = [("model.embed_tokens.weight", "BF16", (32000, 4096)), ("lm_head.weight", "BF16", (32000, 4096)),
               ("model.norm.weight", "BF16", (4096,))]
    for i in range(layers):
        for m, shape in SHAPES.items():
            entries.append((f"model.layers.{i}.{m}.weight", "BF16", shape))
        for n in ("input_layernorm", "post_attention_layernorm"):
            entries.append((f"model.layers.{i}.{n}.weight", "BF16", (4096,)))
    g = torch.Generator().manual_seed(0)
    tmp = folder / "model.safetensors.partial"
    w = StreamingWriter(tmp, entries, {"format": "pt"})
    for name, _, shape in entries:
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
        w.write(name, t.to(torch.bfloat16))
    w.close()
    tmp.rename(folder / "model.safetensors")




def run_child_json(code: str, args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``code`` in a fresh interpreter (so its peak RSS is its own); parse its last stdout line as JSON."""
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, **(env or {})})
    if p.returncode != 0:
        raise SystemExit(f"child {args[:1]} failed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def build_llama_50m(model_dir: Path, *, layers: int = 4, vocab: int = 32000) -> Path:
    """The 50M Llama of the training benchmarks (hidden 1024, intermediate 2816, 16 heads, random fp32
    weights) with a small BPE tokenizer, written as a model folder (cached: built once)."""
    if (model_dir / "config.json").exists():
        return model_dir
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from fixtures.build import train_bpe_tokenizer

    torch.manual_seed(0)
    tok = train_bpe_tokenizer()
    cfg = LlamaConfig(hidden_size=1024, num_hidden_layers=layers, intermediate_size=2816, vocab_size=vocab,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir
