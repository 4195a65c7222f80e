"""merge: streaming W + scatter(delta) into safetensors / ONNX, with the parity check, on every fixture."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from neuroada_tools.check.run import run_check
from neuroada_tools.cli import main
from neuroada_tools.errors import ParityError
from neuroada_tools.export import merge as merge_mod
from neuroada_tools.export.merge import merge_tensor
from neuroada_tools.index.build import run_index
from neuroada_tools.io.checkpoint import open_checkpoint
from neuroada_tools.io.safetensors_file import read_header
from neuroada_tools.io.sidecar import DeltaSidecar, read_index, write_delta

ARCHS = ["llama", "qwen2", "mistral", "gpt2", "opt", "bert-cls", "bert-base", "llama-fp16"]


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def digest_tree(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir()) if f.is_file()}


def make_sidecars(model: Path, tmp: Path, k: int = 3, scale: float = 0.05, seed: int = 0, **delta_kw):
    """An index of ``model`` and a random non-zero delta (plus a classifier head for BERT)."""
    ip = tmp / "m.index.safetensors"
    run_index(model, k, ip, force=True)
    index = read_index(ip)
    g = torch.Generator().manual_seed(seed)
    deltas = {n: torch.randn(t.shape, generator=g) * scale for n, t in index.indices.items()}
    cfg = json.loads((model / "config.json").read_text())
    dense, task, info = {}, "causal-lm", {}
    if cfg["model_type"] == "bert":
        h = cfg["hidden_size"]
        dense = {
            "classifier.weight": torch.randn(3, h, generator=g) * 0.2,
            "classifier.bias": torch.randn(3, generator=g) * 0.1,
        }
        task, info = "classification", {"num_labels": 3, "label_names": ["a", "b", "c"]}
    d = DeltaSidecar(index.digest, deltas, dense, task, info)
    for key, v in delta_kw.items():
        setattr(d, key, v)
    dp = tmp / "m.delta.safetensors"
    write_delta(dp, d)
    return ip, dp, index, d


@pytest.fixture(scope="module")
def merged(fixture_models, tmp_path_factory):
    """arch -> (tmp folder, index path, delta path, merged folder, merge summary JSON), merged with --check."""
    out = {}
    for arch in ARCHS:
        tmp = tmp_path_factory.mktemp(arch)
        before = digest_tree(fixture_models[arch])
        ip, dp, _, _ = make_sidecars(fixture_models[arch], tmp)
        r = run_cli(
            "merge", "--model", fixture_models[arch], "--index", ip, "--delta", dp, "-o", tmp / "merged", "--json", "-q"
        )
        assert r.exit_code == 0, (arch, r.output)
        assert digest_tree(fixture_models[arch]) == before, "the base must never be written"
        out[arch] = (tmp, ip, dp, tmp / "merged", json.loads(r.stdout))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_safetensors_parity_and_values(fixture_models, merged, arch):
    tmp, ip, dp, out, summary = merged[arch]
    parity = summary["parity"]["comparisons"]["merged_vs_unmerged"]
    assert parity["passed"] and parity["argmax_agreement"] == 1.0
    base = open_checkpoint(fixture_models[arch])
    index = read_index(ip)
    from neuroada_tools.io.sidecar import read_delta

    delta = read_delta(dp, index)
    res = open_checkpoint(out)
    for n in index.indices:
        out_name = n if n in res.tensors else "bert." + n
        got = res.read(out_name)
        e = index.entries[n]
        want = merge_tensor(base.read(n), index.indices[n], delta.deltas[n], e.transposed, base.read(n).dtype)
        assert torch.equal(got, want), n
        assert not torch.equal(got, base.read(n)), n
    # provenance in every output file
    for f in res.files:
        meta = read_header(f).metadata
        assert meta["format"] == "pt" and meta["neuroada.index_sha256"] == index.digest
        assert meta["neuroada.delta_sha256"] == delta.digest


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_folder_loads_without_missing_keys(merged, arch):
    _, _, _, out, summary = merged[arch]
    import transformers

    cls = (
        transformers.AutoModelForSequenceClassification
        if summary["task"] == "classification"
        else transformers.AutoModelForCausalLM
    )
    _, info = cls.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert (out / "tokenizer.json").exists() and (out / "config.json").exists()


def test_sharding_kept(fixture_models, merged):
    base = fixture_models["llama"]
    out = merged["llama"][3]
    assert sorted(p.name for p in base.glob("*.safetensors")) == sorted(p.name for p in out.glob("*.safetensors"))
    bmap = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    omap = json.loads((out / "model.safetensors.index.json").read_text())
    assert omap["weight_map"] == bmap
    assert omap["metadata"]["total_size"] == sum(r.raw.nbytes for r in open_checkpoint(out).tensors.values())


def test_max_shard_size_and_dtype(fixture_models, tmp_path):
    ip, dp, _, _ = make_sidecars(fixture_models["qwen2"], tmp_path)
    out = tmp_path / "o"
    r = run_cli(
        "merge",
        "--model",
        fixture_models["qwen2"],
        "--index",
        ip,
        "--delta",
        dp,
        "-o",
        out,
        "--dtype",
        "fp32",
        "--max-shard-size",
        "200KB",
        "--json",
        "-q",
    )
    assert r.exit_code == 0, r.output
    ck = open_checkpoint(out)
    assert len(ck.files) >= 2 and all(f.stat().st_size <= 200_000 + 300_000 for f in ck.files)
    assert {r.dtype for r in ck.tensors.values()} == {"F32"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    # fp32 output of a bf16 base is checked against the bf16 unmerged model: within the bf16 tolerance
    assert json.loads(r.stdout)["parity"]["passed"]


def test_bert_base_merge_writes_task_names(merged):
    out = merged["bert-base"][3]
    names = set(open_checkpoint(out).tensors)
    assert "classifier.weight" in names and "bert.encoder.layer.0.attention.self.query.weight" in names
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"] and cfg["id2label"] == {
        "0": "a",
        "1": "b",
        "2": "c",
    }


ONNX_ARCHS = ["llama", "qwen2", "gpt2", "opt", "bert-cls", "bert-base"]


@pytest.mark.parametrize("arch", ONNX_ARCHS)
def test_onnx_parity(merged, fixture_models, arch, tmp_path):
    _, ip, dp, _, _ = merged[arch]
    out = tmp_path / "onnx"
    extra = ["--with-past"] if arch in ("llama", "gpt2") else []
    r = run_cli(
        "merge",
        "--model",
        fixture_models[arch],
        "--index",
        ip,
        "--delta",
        dp,
        "--to",
        "onnx",
        "-o",
        out,
        "--json",
        "-q",
        *extra,
    )
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    comps = s["parity"]["comparisons"]
    assert comps["onnx_vs_unmerged"]["passed"] and comps["merged_vs_unmerged"]["passed"]
    assert (out / "model.onnx").exists() and (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert s["onnx_outputs"] == ["logits"]
    want = ["input_ids", "attention_mask"] + (["token_type_ids"] if arch.startswith("bert") else [])
    assert s["onnx_inputs"] == want
    if extra:
        assert comps["onnx_with_past_step"]["passed"]
        assert (out / "model_with_past.onnx").exists()
    assert not list(tmp_path.glob(".onnx*")), "staging folders must be removed"


def _wrong_merge(monkeypatch, how: str):
    real = merge_mod.merge_tensor

    def wrong(stored, idx, delta, transposed, out_dtype, **kw):
        if how == "transposed":  # delta added at transposed positions (square weights only)
            return (
                real(stored, idx, delta, not transposed, out_dtype)
                if stored.shape[0] == stored.shape[1]
                else real(stored, idx, delta, transposed, out_dtype)
            )
        w = stored.to(torch.bfloat16).to(torch.float32)  # cast to bf16 before adding
        return real(w, idx, delta.to(torch.bfloat16), transposed, out_dtype)

    monkeypatch.setattr(merge_mod, "merge_tensor", wrong)


@pytest.mark.parametrize("how", ["transposed", "bf16-first"])
def test_wrong_merge_is_caught(fixture_models, tmp_path, monkeypatch, how):
    ip, dp, _, _ = make_sidecars(fixture_models["llama"], tmp_path)
    _wrong_merge(monkeypatch, how)
    out = tmp_path / "bad"
    r = run_cli("merge", "--model", fixture_models["llama"], "--index", ip, "--delta", dp, "-o", out, "-q")
    assert r.exit_code == 1, r.output
    assert re.match(r"error: parity check failed \(fp32\): merged_vs_fused: max abs \S+ > tolerance 0 ", r.stderr)
    with pytest.raises(ParityError):
        run_check(fixture_models["llama"], ip, dp, merged_dir=out)
    # the independent reference (x W^T + x S^T, evaluated in float64) catches it too, at its calibrated bound
    comps = run_check(fixture_models["llama"], ip, dp, merged_dir=out, raise_on_failure=False).comparisons
    assert not comps["merged_vs_unmerged"]["passed"], comps
    r = run_cli("check", "--model", fixture_models["llama"], "--index", ip, "--delta", dp, "--merged", out)
    assert r.exit_code == 1 and "FAILED" in r.output


# ------------------------------------------------------------------ refusals


def expect_refusal(args, pattern, out: Path):
    r = run_cli(*args)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(pattern, lines[0]), r.stderr
    if not out.exists():
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], (
            "temporary folder left behind"
        )
    return lines[0]


def test_refuses_delta_of_another_index(fixture_models, tmp_path):
    ip, dp, _, _ = make_sidecars(fixture_models["gpt2"], tmp_path, index_digest="b" * 64)
    out = tmp_path / "o"
    expect_refusal(
        ["merge", "--model", fixture_models["gpt2"], "--index", ip, "--delta", dp, "-o", out],
        r"m.delta.safetensors: made for index sha256 bbbbbbbbbbbb",
        out,
    )
    assert not out.exists()


def test_refuses_other_base_with_same_shapes(fixture_models, tmp_path):
    ip, dp, _, _ = make_sidecars(fixture_models["gpt2"], tmp_path)
    other = tmp_path / "other"
    shutil.copytree(fixture_models["gpt2"], other)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(other / "model.safetensors"))
    sd["transformer.h.1.mlp.c_proj.weight"] = sd["transformer.h.1.mlp.c_proj.weight"] * 1.01
    save_file(sd, str(other / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "o"
    expect_refusal(
        ["merge", "--model", other, "--index", ip, "--delta", dp, "-o", out],
        r"'transformer.h.1.mlp.c_proj.weight' differs from the base the index was made from",
        out,
    )
    assert not out.exists()


def test_refuses_nan_delta_and_shape_mismatch(fixture_models, tmp_path):
    ip, dp, index, d = make_sidecars(fixture_models["opt"], tmp_path)
    name = sorted(index.indices)[0]
    d.deltas[name] = d.deltas[name].clone()
    d.deltas[name][0, 0] = float("inf")
    write_delta(dp, d)
    out = tmp_path / "o"
    expect_refusal(
        ["merge", "--model", fixture_models["opt"], "--index", ip, "--delta", dp, "-o", out],
        re.escape(f"'{name}': contains NaN or Inf"),
        out,
    )
    d.deltas[name] = torch.zeros(d.deltas[name].shape[0], 2)
    write_delta(dp, d)
    expect_refusal(
        ["merge", "--model", fixture_models["opt"], "--index", ip, "--delta", dp, "-o", out],
        re.escape(f"'{name}': shape [{d.deltas[name].shape[0]}, 2] does not match the index"),
        out,
    )


def test_refuses_index_for_another_architecture(fixture_models, tmp_path):
    ip, dp, _, _ = make_sidecars(fixture_models["mistral"], tmp_path)
    out = tmp_path / "o"
    expect_refusal(
        ["merge", "--model", fixture_models["gpt2"], "--index", ip, "--delta", dp, "-o", out],
        r"base has no tensor 'model.layers.0.mlp.down_proj.weight'",
        out,
    )


def test_refuses_output_in_base_or_existing(fixture_models, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(fixture_models["gpt2"], base)
    ip, dp, _, _ = make_sidecars(base, tmp_path)
    before = digest_tree(base)
    for o in (base, base / "sub"):
        expect_refusal(
            ["merge", "--model", base, "--index", ip, "--delta", dp, "-o", o, "--force"],
            r"output folder is or lies inside the base model folder",
            o,
        )
    expect_refusal(
        ["merge", "--model", base, "--index", ip, "--delta", dp, "-o", tmp_path, "--force"],
        r"output folder contains the base model folder",
        tmp_path,
    )
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep").write_text("x")
    expect_refusal(
        ["merge", "--model", base, "--index", ip, "--delta", dp, "-o", existing],
        r"exists: already exists \(use --force to overwrite\)",
        existing,
    )
    assert (existing / "keep").read_text() == "x"
    assert digest_tree(base) == before
    assert (
        run_cli("merge", "--model", base, "--index", ip, "--delta", dp, "-o", existing, "--force", "-q").exit_code == 0
    )
    assert not (existing / "keep").exists() and (existing / "model.safetensors").exists()


def test_bf16_tolerance_is_applied_and_documented():
    from neuroada_tools.check.parity import TOLERANCES

    assert TOLERANCES["fp32"]["merged"].atol == 1e-5 and TOLERANCES["fp32"]["onnx"].atol == 1e-4
    assert TOLERANCES["bf16"]["merged"].rtol > 0 and TOLERANCES["fp16"]["merged"].rtol > 0


def test_stale_temporaries_of_dead_runs_are_removed(fixture_models, tmp_path):
    ip, dp, _, _ = make_sidecars(fixture_models["gpt2"], tmp_path)
    out = tmp_path / "o"
    dead = tmp_path / ".o.tmp-999999999"  # no such process
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    alive = tmp_path / f".o.tmp-{1}"  # pid 1 exists: left alone
    alive.mkdir()
    assert (
        run_cli("merge", "--model", fixture_models["gpt2"], "--index", ip, "--delta", dp, "-o", out, "-q").exit_code
        == 0
    )
    assert not dead.exists() and alive.exists() and (out / "model.safetensors").exists()
