"""Parity on models whose config holds special token ids the embedding lacks, and unexpected errors
inside a comparison: one line naming the comparison, exit code 1, no traceback.

Tiny test models (hf-internal-testing's tiny GPT-2s, for one) keep GPT-2's ``50256`` as bos/eos with
a vocabulary of a few hundred; the check used to feed that id as padding and crash in the embedding
(``IndexError: index out of range in self``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from neuroada_tools.check import run as run_mod
from neuroada_tools.check.parity import make_fresh_inputs
from neuroada_tools.check.run import comparison_errors, run_check
from neuroada_tools.cli import main
from neuroada_tools.errors import ModelError, ParityError
from neuroada_tools.hf.signature import first_id_within, input_vocab_size
from neuroada_tools.index.build import run_index
from neuroada_tools.io.sidecar import DeltaSidecar, read_index, write_delta

VOCAB = 96


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _gpt2() -> torch.nn.Module:
    """Every special id outside the vocabulary (GPT-2's embedding has no padding_idx, so it builds)."""
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=50256, eos_token_id=50256, pad_token_id=50257))


def _llama() -> torch.nn.Module:
    """No pad id and bos/eos outside the vocabulary (the check used to pad with eos)."""
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        bos_token_id=VOCAB + 3, eos_token_id=[VOCAB + 4, VOCAB + 5],
                                        pad_token_id=None, tie_word_embeddings=False))


def _base_with_sidecars(tmp: Path, build) -> tuple[Path, Path, Path]:
    """A saved tiny model with out-of-vocabulary special ids, its k=2 index and a random delta."""
    torch.manual_seed(0)
    model = build()
    base = tmp / "base"
    model.save_pretrained(base)
    cfg = json.loads((base / "config.json").read_text())
    ids = [cfg.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")]
    flat = [i for v in ids if v is not None for i in (v if isinstance(v, list) else [v])]
    assert flat and all(i >= cfg["vocab_size"] for i in flat), cfg  # the premise of these tests
    ip, dp = tmp / "m.index.safetensors", tmp / "m.delta.safetensors"
    run_index(base, 2, ip)
    index = read_index(ip)
    g = torch.Generator().manual_seed(1)
    write_delta(dp, DeltaSidecar(index.digest, {n: torch.randn(t.shape, generator=g) * 0.05
                                                for n, t in index.indices.items()}, {}, "causal-lm", {}))
    return base, ip, dp


# --------------------------------------------------------------------------- inputs


def test_first_id_within_and_input_vocab_size():
    assert first_id_within([50257, [50256, 3]], VOCAB) == 3
    assert first_id_within([None, 7], VOCAB) == 7
    assert first_id_within([None], VOCAB) is None
    assert first_id_within([VOCAB, -1, True], VOCAB) is None  # a bool is not an id
    model = _gpt2()
    assert input_vocab_size(model) == VOCAB
    model.resize_token_embeddings(VOCAB + 8)  # the embedding, not the config, decides what can be fed
    model.config.vocab_size = VOCAB
    assert input_vocab_size(model) == VOCAB + 8


def test_fresh_inputs_hold_only_ids_the_embedding_has():
    cfg = type("Cfg", (), {"vocab_size": 50})()
    a = make_fresh_inputs(cfg, batch=4, seq=9, seed=7, pad_token_id=50257)
    assert ((a["input_ids"] >= 0) & (a["input_ids"] < 50)).all()
    assert (a["input_ids"][a["attention_mask"] == 0] == 0).all()  # an out-of-range pad is treated as None
    assert torch.equal(a["input_ids"], make_fresh_inputs(cfg, batch=4, seq=9, seed=7, pad_token_id=None)["input_ids"])
    b = make_fresh_inputs(cfg, batch=4, seq=9, seed=7, pad_token_id=3, vocab_size=20)
    assert b["input_ids"].max() < 20 and (b["input_ids"][b["attention_mask"] == 0] == 3).all()
    # an in-range pad is unchanged from before: the same ids as without vocab_size when it equals the config's
    c = make_fresh_inputs(cfg, batch=4, seq=9, seed=7, pad_token_id=3)
    assert torch.equal(c["input_ids"], make_fresh_inputs(cfg, batch=4, seq=9, seed=7, pad_token_id=3,
                                                         vocab_size=50)["input_ids"])


# --------------------------------------------------------------------------- end to end


def test_merge_safetensors_and_onnx_of_gpt2_with_special_ids_outside_the_vocabulary(tmp_path):
    base, ip, dp = _base_with_sidecars(tmp_path, _gpt2)
    r = run_cli("merge", "--model", base, "--index", ip, "--delta", dp, "-o", tmp_path / "merged", "--json", "-q")
    assert r.exit_code == 0, r.output
    comps = json.loads(r.stdout)["parity"]["comparisons"]
    assert comps["merged_vs_unmerged"]["passed"] and comps["merged_vs_unmerged"]["argmax_agreement"] == 1.0
    r = run_cli("merge", "--model", base, "--index", ip, "--delta", dp, "--to", "onnx", "--with-past",
                "-o", tmp_path / "onnx", "--json", "-q")
    assert r.exit_code == 0, r.output
    comps = json.loads(r.stdout)["parity"]["comparisons"]
    for name in ("merged_vs_unmerged", "onnx_vs_unmerged", "onnx_with_past_step"):
        assert comps[name]["passed"], (name, comps[name])


def test_merge_of_llama_with_eos_outside_the_vocabulary_and_no_pad(tmp_path):
    base, ip, dp = _base_with_sidecars(tmp_path, _llama)
    r = run_cli("merge", "--model", base, "--index", ip, "--delta", dp, "-o", tmp_path / "merged", "--json", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["parity"]["comparisons"]["merged_vs_unmerged"]["passed"]
    r = run_cli("check", "--model", base, "--index", ip, "--delta", dp, "--merged", tmp_path / "merged", "--json")
    assert r.exit_code == 0, r.output


# --------------------------------------------------------------------------- unexpected errors


def test_comparison_errors_wraps_only_unexpected_exceptions():
    with pytest.raises(ParityError) as info:
        with comparison_errors("merged_vs_unmerged"):
            raise IndexError("index out of range in self\nsecond line")
    assert str(info.value) == "parity check 'merged_vs_unmerged' failed: IndexError: index out of range in self"
    assert info.value.exit_code == 1 and isinstance(info.value.__cause__, IndexError)
    with pytest.raises(ParityError, match=r"^parity check 'x' failed: RuntimeError$"):
        with comparison_errors("x"):
            raise RuntimeError()
    with pytest.raises(ModelError, match="^own message$"):  # the project's own errors pass unchanged
        with comparison_errors("x"):
            raise ModelError("own message")
    with pytest.raises(KeyboardInterrupt):
        with comparison_errors("x"):
            raise KeyboardInterrupt


def _one_line_error(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


def test_an_unexpected_error_in_a_comparison_is_one_line_naming_it(tmp_path, monkeypatch):
    base, ip, dp = _base_with_sidecars(tmp_path, _gpt2)
    real = run_mod.compare_logits

    def broken(reference, other, mask):
        if reference.dtype == torch.float32:  # merged vs fused (the noise floor's reference is float64)
            raise IndexError("index out of range in self\n(a second line that must not show)")
        return real(reference, other, mask)

    monkeypatch.setattr(run_mod, "compare_logits", broken)
    out = tmp_path / "merged"
    r = run_cli("merge", "--model", base, "--index", ip, "--delta", dp, "-o", out, "-q")
    assert r.exit_code == 1
    want = "error: parity check 'merged_vs_unmerged' failed: IndexError: index out of range in self"
    assert _one_line_error(r) == want
    r = run_cli("check", "--model", base, "--index", ip, "--delta", dp, "--merged", out)
    assert r.exit_code == 1 and re.fullmatch(r"error: parity check 'merged_vs_unmerged' failed: IndexError: .*",
                                             _one_line_error(r))
    monkeypatch.setattr(run_mod, "compare_logits", real)
    assert run_check(base, ip, dp, merged_dir=out).passed  # the same files check fine without the fault


def test_an_unexpected_error_in_the_reference_run_is_one_line(tmp_path, monkeypatch):
    base, ip, dp = _base_with_sidecars(tmp_path, _llama)

    def broken(model, inputs):
        raise RuntimeError("expected scalar type Float but found BFloat16")

    monkeypatch.setattr(run_mod, "run_torch", broken)
    r = run_cli("merge", "--model", base, "--index", ip, "--delta", dp, "-o", tmp_path / "merged", "-q")
    assert r.exit_code == 1
    assert _one_line_error(r) == (
        "error: parity check 'unmerged_reference' failed: RuntimeError: expected scalar type Float but found BFloat16"
    )
