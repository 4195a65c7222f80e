"""`neuroada-tools index` on every fixture architecture: correctness, determinism, bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from neuroada_tools.cli import main
from neuroada_tools.index.criteria import reference_select
from neuroada_tools.io.checkpoint import open_checkpoint
from neuroada_tools.io.sidecar import fingerprint, read_index

ARCHS = ["llama", "qwen2", "mistral", "gpt2", "opt", "bert-cls", "bert-base", "llama-fp16"]

# what the default targets must be, per architecture, as (count, suffixes that must all appear)
EXPECTED = {
    "llama": (14, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    "qwen2": (14, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    "mistral": (14, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    "gpt2": (8, {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}),
    "opt": (12, {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}),
    "bert-cls": (12, {"query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"}),
    "bert-base": (12, {"query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"}),
    "llama-fp16": (14, {"q_proj", "down_proj"}),
}


def run_cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_index_equals_reference_topk(fixture_models, tmp_path, arch):
    out = tmp_path / "i.index.safetensors"
    r = run_cli("index", fixture_models[arch], "-k", "5", "-o", out, "-q")
    assert r.exit_code == 0, r.output
    index = read_index(out)
    ckpt = open_checkpoint(fixture_models[arch])
    count, suffixes = EXPECTED[arch]
    assert len(index.indices) == count
    mods = {n.removesuffix(".weight") for n in index.indices}
    for s in suffixes:
        assert any(m.endswith(s) for m in mods), s
    for n in index.indices:
        assert not re.search(r"(embed|norm|lm_head|classifier|pooler|wte|wpe|ln_)", n), n
        stored = ckpt.read(n)
        entry = index.entries[n]
        logical = stored.t() if arch == "gpt2" else stored
        assert entry.layout == ("in_out" if arch == "gpt2" else "out_in")
        assert entry.shape == tuple(logical.shape)
        assert torch.equal(index.indices[n], reference_select(logical, 5)), n
        assert entry.fingerprint == fingerprint(logical, index.indices[n])


def test_conv1d_index_has_d_out_rows(fixture_models, tmp_path):
    out = tmp_path / "g.index.safetensors"
    run_cli("index", fixture_models["gpt2"], "-k", "3", "-o", out, "-q")
    index = read_index(out)
    ckpt = open_checkpoint(fixture_models["gpt2"])
    name = "transformer.h.0.mlp.c_fc.weight"
    d_in, d_out = ckpt.tensors[name].shape  # Conv1D stores [in, out]
    assert d_in != d_out
    assert tuple(index.indices[name].shape) == (d_out, 3)


def test_ties_go_to_lower_column(fixture_models, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    for arch in ("llama", "qwen2", "llama-fp16"):
        row = open_checkpoint(fixture_models[arch]).read(name)[0].float().abs()
        tied = (row == 0.5).nonzero().flatten().tolist()
        assert len(tied) >= 3, "fixture must plant ties in row 0"
        k = int((row > 0.5).sum()) + 2  # the larger entries, then two of the tied ones
        out = tmp_path / f"{arch}.index.safetensors"
        assert run_cli("index", fixture_models[arch], "-k", k, "-o", out, "-q").exit_code == 0
        chosen = set(read_index(out).indices[name][0].tolist())
        assert set(tied[:2]) <= chosen and not set(tied[2:]) & chosen


def test_deterministic_and_input_form_independent(fixture_models, tmp_path):
    llama = fixture_models["llama"]
    outs = []
    for i, src in enumerate([llama, llama / "model.safetensors.index.json", llama]):
        out = tmp_path / f"{i}.index.safetensors"
        assert run_cli("index", src, "-k", "4", "-o", out, "-q").exit_code == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]
    bert = fixture_models["bert-cls"]
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    run_cli("index", bert, "-k", "4", "-o", a, "-q")
    run_cli("index", bert / "model.safetensors", "-k", "4", "-o", b, "-q")
    assert a.read_bytes() == b.read_bytes()


def test_subprocess_determinism_random_criterion(fixture_models, tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"r{i}.safetensors"
        subprocess.run([sys.executable, "-m", "neuroada_tools", "index", str(fixture_models["opt"]), "-k", "3",
                        "--criterion", "random", "--seed", "7", "-o", str(out), "-q"], check=True, capture_output=True)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    idx = read_index(tmp_path / "r0.safetensors")
    assert idx.criterion == "random" and idx.seed == 7


def test_smallest_criterion(fixture_models, tmp_path):
    out = tmp_path / "s.safetensors"
    run_cli("index", fixture_models["mistral"], "-k", "3", "--criterion", "smallest", "-o", out, "-q")
    index = read_index(out)
    ckpt = open_checkpoint(fixture_models["mistral"])
    for n, idx in index.indices.items():
        assert torch.equal(idx, reference_select(ckpt.read(n), 3, largest=False))


def test_target_and_exclude_patterns(fixture_models, tmp_path):
    out = tmp_path / "t.safetensors"
    r = run_cli("index", fixture_models["llama"], "-k", "2", "--target", "q_proj", "--target", r".*\.1\.mlp\.down_proj",
                "-o", out, "-q")
    assert r.exit_code == 0, r.output
    names = sorted(read_index(out).indices)
    assert names == ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
                     "model.layers.1.self_attn.q_proj.weight"]
    out2 = tmp_path / "e.safetensors"
    r = run_cli("index", fixture_models["llama"], "-k", "2", "--exclude", "mlp.gate_proj", "--exclude", "up_proj",
                "-o", out2, "-q")
    assert r.exit_code == 0
    assert not any(re.search("gate_proj|up_proj", n) for n in read_index(out2).indices)
    assert len(read_index(out2).indices) == 10


def test_summary_json(fixture_models, tmp_path):
    out = tmp_path / "j.safetensors"
    r = run_cli("index", fixture_models["llama"], "-k", "3", "-o", out, "--json")
    s = json.loads(r.stdout)
    index = read_index(out)
    assert s["tensors_adapted"] == 14 and s["trainable_parameters"] == index.trainable_parameters()
    assert s["model_parameters"] == open_checkpoint(fixture_models["llama"]).total_parameters
    assert abs(s["trainable_share"] - s["trainable_parameters"] / s["model_parameters"]) < 1e-12
    assert s["sha256"] == index.digest


def test_clip_k(fixture_models, tmp_path):
    out = tmp_path / "c.safetensors"
    r = run_cli("index", fixture_models["llama"], "-k", "100", "-o", out, "-q")
    assert r.exit_code == 2
    assert re.search(r"error: 'model\.layers\.\d\.\S+\.weight': k=100 exceeds its \d+ input connections", r.stderr)
    assert not out.exists()
    r = run_cli("index", fixture_models["llama"], "-k", "100", "--clip-k", "-o", out, "--json")
    assert r.exit_code == 0
    index = read_index(out)
    for n, t in index.indices.items():
        assert t.shape[1] == min(100, index.entries[n].shape[1])


# ------------------------------------------------------------------ bad input


def expect_error(args, pattern, out=None):
    r = run_cli(*args)
    assert r.exit_code == 2, (r.exit_code, r.output)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert re.search(pattern, lines[0]), lines[0]
    if out is not None:
        assert not Path(out).exists()
        assert not list(Path(out).parent.glob(f".{Path(out).name}.tmp-*"))
    return lines[0]


def test_missing_file(tmp_path):
    out = tmp_path / "o.safetensors"
    expect_error(["index", tmp_path / "nope.safetensors", "-k", "2", "-o", out], r"nope.safetensors: no such file", out)


def test_not_safetensors(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_text("this is not a checkpoint at all")
    out = tmp_path / "o.safetensors"
    expect_error(["index", bad, "-o", out], r"model.safetensors: not a safetensors file \(header length \d+ exceeds "
        r"100 MB\)", out)


def test_truncated_checkpoint(fixture_models, tmp_path):
    src = fixture_models["gpt2"] / "model.safetensors"
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(src.read_bytes()[: src.stat().st_size - 100])
    out = tmp_path / "o.safetensors"
    expect_error(["index", bad, "-o", out], r"model.safetensors: truncated: tensor '.+' ends at byte \d+", out)


def test_offsets_past_end(tmp_path):
    bad = tmp_path / "x.safetensors"
    hdr = json.dumps({"a.0.w.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
    bad.write_bytes(struct.pack("<Q", len(hdr)) + hdr + b"\0" * 16)
    expect_error(
        ["index", bad, "-o", tmp_path / "o"],
        r"x.safetensors: truncated: tensor 'a.0.w.weight' ends at byte 64 but the file holds only 16 data bytes",
    )


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_shard_missing(fixture_models, tmp_path):
    m = _copy(fixture_models["llama"], tmp_path / "m")
    shard = sorted(m.glob("model-0000*.safetensors"))[1]
    shard.unlink()
    expect_error(["index", m, "-o", tmp_path / "o"], rf"model.safetensors.index.json: shard '{shard.name}' is missing")


@pytest.mark.parametrize("evil", ["../x.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_shard_outside_folder(fixture_models, tmp_path, evil):
    m = _copy(fixture_models["llama"], tmp_path / "m")
    (tmp_path / "x.safetensors").write_bytes((m / sorted(m.glob("model-0000*"))[0].name).read_bytes())
    idx = m / "model.safetensors.index.json"
    doc = json.loads(idx.read_text())
    first = next(iter(doc["weight_map"]))
    doc["weight_map"][first] = evil
    idx.write_text(json.dumps(doc))
    expect_error(["index", m, "-o", tmp_path / "o"], re.escape(f"shard path '{evil}' lies outside the model folder"))


def test_shard_symlinks_inside_folder_work(fixture_models, tmp_path):
    """A Hugging Face cache snapshot is a folder of symlinks into ../blobs."""
    blobs = tmp_path / "blobs"
    snap = tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for f in fixture_models["llama"].iterdir():
        (blobs / f.name).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(blobs / f.name, snap))
    out = tmp_path / "o.safetensors"
    assert run_cli("index", snap, "-k", "2", "-o", out, "-q").exit_code == 0


def test_tensor_listed_twice_or_missing_from_shard(fixture_models, tmp_path):
    m = _copy(fixture_models["llama"], tmp_path / "m")
    idx = m / "model.safetensors.index.json"
    text = idx.read_text()
    doc = json.loads(text)
    name, shard = next(iter(doc["weight_map"].items()))
    other = next(s for s in sorted(set(doc["weight_map"].values())) if s != shard)
    doc["weight_map"][name] = other
    idx.write_text(json.dumps(doc))
    expect_error(
        ["index", m, "-o", tmp_path / "o"], re.escape(f"tensor '{name}' is mapped to {other}, which does not hold it")
    )
    dup = text.replace('"weight_map": {', f'"weight_map": {{"{name}": "{shard}",', 1)
    assert dup != text
    idx.write_text(dup)
    expect_error(["index", m, "-o", tmp_path / "o"], re.escape(f"tensor '{name}' listed twice"))


def test_no_tensor_matched(fixture_models, tmp_path):
    expect_error(
        ["index", fixture_models["llama"], "--target", "no_such_module", "-o", tmp_path / "o"],
        r"no tensor matched --target no_such_module",
    )


def test_target_matching_non_2d_or_integer(fixture_models, tmp_path):
    expect_error(
        ["index", fixture_models["llama"], "--target", "input_layernorm", "-o", tmp_path / "o"],
        r"'model.layers.0.input_layernorm.weight': shape \[\d+\] is not a 2-D weight",
    )
    f = tmp_path / "ints.safetensors"
    from safetensors.torch import save_file

    save_file({"layers.0.q.weight": torch.zeros(4, 4, dtype=torch.int32)}, str(f))
    expect_error(
        ["index", f, "--target", "q", "-o", tmp_path / "o"], r"'layers.0.q.weight': dtype I32 is not a float weight"
    )


def test_output_exists_or_is_input(fixture_models, tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    expect_error(
        ["index", fixture_models["gpt2"], "-o", out], r"o.safetensors: already exists \(use --force to overwrite\)"
    )
    assert out.read_bytes() == b"keep me"
    assert run_cli("index", fixture_models["gpt2"], "-k", "2", "-o", out, "--force", "-q").exit_code == 0
    assert read_index(out).k == 2
    m = _copy(fixture_models["gpt2"], tmp_path / "m")
    before = (m / "model.safetensors").read_bytes()
    expect_error(["index", m, "-o", m / "model.safetensors", "--force"], r"output path is an input")
    assert (m / "model.safetensors").read_bytes() == before


def test_k_below_one(fixture_models, tmp_path):
    expect_error(["index", fixture_models["gpt2"], "-k", "0", "-o", tmp_path / "o"], r"-k must be >= 1, got 0")


def test_no_traceback_in_subprocess(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "neuroada_tools", "index", str(tmp_path / "missing"), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and p.stderr.startswith("error: ")


def test_help_lists_commands_and_examples():
    r = run_cli("--help")
    for c in ("index", "train-sparse", "merge"):
        assert c in r.output
    for c in ("index", "train-sparse", "merge"):
        assert "Example" in run_cli(c, "--help").output


# ---------------------------------------------------------------- streaming output, target cache


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert-cls"])
@pytest.mark.parametrize("criterion", ["magnitude", "random"])
def test_streamed_index_equals_in_memory_write(fixture_models, tmp_path, arch, criterion):
    """run_index streams tensors and fills fingerprints in at the end; same bytes as write_index."""
    from neuroada_tools.index.build import build_index, run_index
    from neuroada_tools.io.sidecar import write_index

    summary = run_index(fixture_models[arch], 3, tmp_path / "streamed", criterion=criterion, seed=4)
    in_memory = build_index(fixture_models[arch], 3, criterion=criterion, seed=4)
    digest = write_index(tmp_path / "whole", in_memory)
    assert (tmp_path / "streamed").read_bytes() == (tmp_path / "whole").read_bytes()
    assert summary.sha256 == digest
    assert summary.trainable_parameters == in_memory.trainable_parameters()
    assert "0" * 64 not in (tmp_path / "streamed").read_bytes().decode("latin-1")  # placeholders replaced


def test_failed_index_leaves_no_partial_output(fixture_models, tmp_path, monkeypatch):
    """A failure after some tensors were streamed: no output, no temporary left behind."""
    from neuroada_tools.index import build as index_mod

    calls = []
    real = index_mod.select

    def failing_select(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(*a, **kw)

    monkeypatch.setattr(index_mod, "select", failing_select)
    with pytest.raises(OSError):
        index_mod.run_index(fixture_models["llama"], 2, tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_replace_metadata_refuses_a_size_change(tmp_path):
    from neuroada_tools.io.safetensors_file import StreamingWriter

    w = StreamingWriter(tmp_path / "f", [("a", "I32", (1, 1))], {"fp": "0" * 8})
    w.write("a", torch.zeros(1, 1, dtype=torch.int32))
    w.replace_metadata({"fp": "1" * 8})  # same width: fine
    with pytest.raises(ValueError, match="new metadata changes the header size"):
        w.replace_metadata({"fp": "1" * 200})
    w.abort()


def test_target_list_is_cached_per_config(fixture_models, tmp_path, monkeypatch):
    from neuroada_tools.index import targets

    monkeypatch.setenv("NEUROADA_CACHE_DIR", str(tmp_path / "cache"))
    ckpt = open_checkpoint(fixture_models["gpt2"])
    first = targets.resolve_targets(ckpt)
    files = list((tmp_path / "cache" / "targets").glob("*.json"))
    assert len(files) == 1

    def no_build(config):
        raise AssertionError("architecture_linears called although the answer is cached")

    monkeypatch.setattr(targets, "architecture_linears", no_build)
    assert targets.resolve_targets(ckpt) == first  # from the cache: Conv1D orientation included
    assert any(t.transposed for t in first)

    # a corrupt or ill-typed cache entry is ignored and rebuilt
    monkeypatch.undo()
    monkeypatch.setenv("NEUROADA_CACHE_DIR", str(tmp_path / "cache"))
    for bad in ("{not json", '{"linears": {"a.weight": "yes"}}', "[1, 2]", "\xff"):
        files[0].write_text(bad, encoding="latin-1")
        assert targets.resolve_targets(ckpt) == first
        assert json.loads(files[0].read_text())["linears"]


def test_cache_dir_unwritable_still_indexes(fixture_models, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("NEUROADA_CACHE_DIR", str(blocker / "sub"))  # a path under a file: mkdir fails
    result = run_cli("index", fixture_models["llama"], "-k", "2", "-o", tmp_path / "i.safetensors", "--quiet")
    assert result.exit_code == 0, result.output
    assert read_index(tmp_path / "i.safetensors").k == 2


def test_summary_names_the_selection_kernel(fixture_models, tmp_path, monkeypatch):
    from neuroada_tools.kernels import native

    result = run_cli("index", fixture_models["llama"], "-k", "2", "-o", tmp_path / "a", "--json", "-q")
    data = json.loads(result.output)
    assert data["selection_kernel"] == ("native" if native.kernel() is not None else "torch")
    assert data["seconds"] >= 0
    monkeypatch.setitem(native._state, "lib", None)
    result = run_cli("index", fixture_models["llama"], "-k", "2", "-o", tmp_path / "b", "-q")
    assert "note: no C compiler found, so the slower torch selection ran" in result.output
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()  # same index either way
