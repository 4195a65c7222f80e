"""merge --to onnx through onnxruntime-genai's model builder: one ORT GenAI folder, run by generate and check.

Tiny Llama fixture (the builder handles it at 2 layers x 64 wide): the fp32 folder's logits and
greedy tokens are held to the unmerged model (enforced), int4's agreement is reported, the errors
are one line each. SmolLM2-135M (slow): the same on a real LLM, fp32 enforced and int4 reported.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from click.testing import CliRunner

from neuroada_tools.cli import main
from neuroada_tools.errors import BuilderError, OptionError
from neuroada_tools.export import genai_build, pipeline
from neuroada_tools.index.build import run_index
from neuroada_tools.io.sidecar import DeltaSidecar, read_index, write_delta
from tests import llmkit

pytest.importorskip("onnxruntime_genai", reason="the genai extra (scripts/setup.sh installs it)")

smollm2_dir = llmkit.smollm2_dir
GENAI_FILES = {"genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json", "config.json"}


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def sidecars(base, folder, k=2, scale=0.05):
    """An index of ``base`` and a delta of small random values."""
    ip, dp = folder / "t.index.safetensors", folder / "t.delta.safetensors"
    run_index(base, k, ip)
    index = read_index(ip)
    gen = torch.Generator().manual_seed(0)
    deltas = {n: scale * torch.randn(idx.shape, generator=gen) for n, idx in index.indices.items()}
    write_delta(dp, DeltaSidecar(index_digest=index.digest, deltas=deltas, task="causal-lm"))
    return ip, dp


def merge_json(base, ip, dp, out, *extra):
    r = run_cli("merge", "--model", base, "--index", ip, "--delta", dp, "--to", "onnx", "-o", out, "--json", "-q",
                *extra)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def llama(fixture_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("genai")
    base = fixture_models["llama"]
    ip, dp = sidecars(base, d)
    fp32 = merge_json(base, ip, dp, d / "fp32", "--generate", 5)
    return base, ip, dp, d / "fp32", fp32


def test_merge_builds_one_genai_folder_with_fp32_parity_enforced(llama):
    base, ip, dp, out, s = llama
    assert s["exporter"] == "genai" and s["precision"] == "fp32"
    files = {p.name for p in out.iterdir()}
    assert GENAI_FILES <= files and not any(f.startswith("model_with_past") for f in files), files
    assert not any(f.startswith(".") for f in files)  # the builder's cache and temporaries are gone
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name  # the base's own, byte for byte
    import onnxruntime_genai as og

    assert len(og.Tokenizer(og.Model(str(out))).encode("hello world")) > 0  # what a server would load
    onnx = s["parity"]["comparisons"]["onnx_vs_unmerged"]
    assert onnx["runtime"] == "onnxruntime-genai" and onnx["enforced"] and onnx["passed"]
    assert onnx["max_abs"] <= onnx["tolerance"] and onnx["argmax_agreement"] == 1.0
    g = s["parity"]["generation"]
    assert "onnx_genai_vs_unmerged" in g["compared"] and g["passed"] and g["mismatch"] is None
    assert g["tokens"]["onnx_genai"] == g["tokens"]["unmerged"] and g["agreement"]["onnx_genai"] == 1.0


def test_generate_and_check_run_the_genai_folder(llama):
    base, ip, dp, out, _ = llama
    args = ["--prompt", "The cat sat", "--max-new-tokens", 6, "--json", "-q"]
    r = run_cli("generate", "--onnx", out, *args)
    assert r.exit_code == 0, r.output
    genai = json.loads(r.stdout)
    assert genai["source"]["kind"] == "onnx-genai" and "ORT GenAI runtime" in genai["source"]["detail"]
    r = run_cli("generate", "--model", base, "--index", ip, "--delta", dp, *args)
    assert r.exit_code == 0, r.output
    assert [x["token_ids"] for x in genai["results"]] == [x["token_ids"] for x in json.loads(r.stdout)["results"]]
    r = run_cli("check", "--model", base, "--index", ip, "--delta", dp, "--onnx", out, "--generate", 3)
    assert r.exit_code == 0, r.output
    assert "onnx_vs_unmerged" in r.output and "onnx_genai_vs_unmerged" in r.output


def test_genai_parity_catches_a_wrong_weight(llama, tmp_path):
    """A delta the folder was not built from: the fp32 genai comparison fails (exit code 1)."""
    base, ip, _, out, _ = llama
    _, other = sidecars(base, tmp_path, scale=0.5)
    dp2 = tmp_path / "other.delta.safetensors"
    other.rename(dp2)
    r = run_cli("check", "--model", base, "--index", ip, "--delta", dp2, "--onnx", out)
    assert r.exit_code == 1 and "onnx_vs_unmerged" in r.output and "FAILED" in r.output, r.output


def test_int4_agreement_is_reported_not_enforced(llama, tmp_path):
    base, ip, dp, _, _ = llama
    s = merge_json(base, ip, dp, tmp_path / "int4", "--precision", "int4", "--generate", 5)
    assert s["exporter"] == "genai" and s["precision"] == "int4"
    onnx = s["parity"]["comparisons"]["onnx_vs_unmerged"]
    assert onnx["precision"] == "int4" and not onnx["enforced"] and onnx["passed"]
    g = s["parity"]["generation"]
    assert g["reported_only"] == ["onnx_genai"] and 0.0 <= g["agreement"]["onnx_genai"] <= 1.0
    assert g["passed"]  # merged_vs_unmerged stays enforced (and equal)
    assert g["tokens"]["merged"] == g["tokens"]["unmerged"]


def test_auto_falls_back_to_torch_for_architectures_the_builder_lacks(fixture_models, tmp_path):
    base = fixture_models["gpt2"]
    ip, dp = sidecars(base, tmp_path)
    s = merge_json(base, ip, dp, tmp_path / "onnx", "--no-check")
    assert s["exporter"] == "torch" and "does not support GPT2LMHeadModel" in s["exporter_reason"]
    assert (tmp_path / "onnx" / "model.onnx").is_file() and not (tmp_path / "onnx" / "genai_config.json").exists()


def test_errors_are_one_line(fixture_models, tmp_path, monkeypatch):
    gpt2, llama_base = fixture_models["gpt2"], fixture_models["llama"]
    ip, dp = sidecars(gpt2, tmp_path)

    def merge(*extra, base=gpt2, out="o"):
        return pipeline.merge_to_onnx(base, ip, dp, tmp_path / out, **dict(extra))

    with pytest.raises(BuilderError, match=r"does not support GPT2LMHeadModel; export with --exporter torch"):
        merge(("exporter", "genai"))
    with pytest.raises(OptionError, match=r"--precision fp16 is not built for --provider cpu"):
        merge(("exporter", "genai"), ("precision", "fp16"))
    with pytest.raises(OptionError, match=r"--precision int4 is built by --exporter genai"):
        pipeline.choose_exporter("torch", "causal-lm", llama_base, precision="int4")
    with pytest.raises(OptionError, match=r"--with-past is torch's layout"):
        pipeline.choose_exporter("genai", "causal-lm", llama_base, with_past=True)
    assert pipeline.choose_exporter("auto", "causal-lm", llama_base, with_past=True)[0] == "torch"
    assert pipeline.choose_exporter("auto", "classification", llama_base)[0] == "torch"
    # Qwen2 is listed, but a head size of 12 would build and then fail at the first token in the runtime
    qwen2 = fixture_models["qwen2"]
    assert pipeline.choose_exporter("auto", "causal-lm", qwen2) == (
        "torch", "head size 12 (GroupQueryAttention needs a multiple of 8)")
    with pytest.raises(BuilderError, match=r"head size 12 .*; export with --exporter torch"):
        genai_build.check_architecture(qwen2)
    monkeypatch.setattr(genai_build, "builder_available", lambda: False)
    with pytest.raises(BuilderError, match=r"not installed \(pip install 'neuroada-tools\[genai\]'\)"):
        merge(("exporter", "genai"))
    assert pipeline.choose_exporter("auto", "causal-lm", llama_base)[1].startswith("onnxruntime-genai not installed")
    assert not (tmp_path / "o").exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    r = run_cli("merge", "--model", gpt2, "--index", ip, "--delta", dp, "--to", "onnx", "--exporter", "genai",
                "-o", tmp_path / "o")
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "neuroada-tools[genai]" in r.output, r.output


@pytest.mark.slow
def test_smollm2_genai_fp32_parity_and_int4_agreement(smollm2_dir, tmp_path):
    """SmolLM2-135M, k=1 random delta: fp32 logits + 4 greedy tokens enforced (merge --to onnx --generate 4
    through the CLI), then an int4 build of the same merged folder checked alone: agreement reported."""
    from neuroada_tools.check.run import run_check

    start = time.monotonic()
    ip, dp = sidecars(smollm2_dir, tmp_path, k=1, scale=0.01)
    s = merge_json(smollm2_dir, ip, dp, tmp_path / "fp32", "--generate", 4)
    assert s["exporter"] == "genai"
    onnx = s["parity"]["comparisons"]["onnx_vs_unmerged"]
    assert onnx["enforced"] and onnx["passed"] and onnx["argmax_agreement"] == 1.0, onnx
    g = s["parity"]["generation"]
    assert g["passed"] and g["tokens"]["onnx_genai"] == g["tokens"]["unmerged"]
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "fp32").iterdir()}
    assert sizes["model.onnx.data"] > 500e6 and sum(sizes.values()) < 600e6  # one copy of the weights
    fp32_s = time.monotonic() - start

    r = run_cli("merge", "--model", smollm2_dir, "--index", ip, "--delta", dp, "--to", "safetensors", "--no-check",
                "-o", tmp_path / "merged", "-q")
    assert r.exit_code == 0, r.output
    genai_build.build_genai(tmp_path / "merged", tmp_path / "int4", precision="int4")
    c = run_check(smollm2_dir, ip, dp, onnx_dir=tmp_path / "int4", generate=4).to_dict()
    c4, g4 = c["comparisons"]["onnx_vs_unmerged"], c["generation"]
    assert c4["precision"] == "int4" and c4["enforced"] is False and c["passed"]
    assert g4["reported_only"] == ["onnx_genai"] and 0.0 <= g4["agreement"]["onnx_genai"] <= 1.0
    int4_s = time.monotonic() - start - fp32_s
    print(f"SmolLM2 genai: fp32 merge + check {fp32_s:.0f}s, int4 build + check {int4_s:.0f}s; int4 token "
          f"agreement {g4['agreement']['onnx_genai']:.2f}, logit max abs {c4['max_abs']:.3g}, "
          f"argmax agreement {c4['argmax_agreement']:.2f}")


def test_torch_with_past_holds_one_copy_of_the_weights(llama, tmp_path):
    """--exporter torch --with-past: model.onnx and model_with_past.onnx read one model.onnx.data."""
    import onnx

    base, ip, dp, _, _ = llama
    out = tmp_path / "torch"
    s = merge_json(base, ip, dp, out, "--exporter", "torch", "--with-past")
    assert s["exporter"] == "torch" and s["parity"]["comparisons"]["onnx_with_past_step"]["passed"]
    assert sorted(p.name for p in out.glob("*.data")) == ["model.onnx.data"]
    locations = set()
    for name in ("model.onnx", "model_with_past.onnx"):
        graph = onnx.load(str(out / name), load_external_data=False).graph
        locations |= {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}
        assert sum(len(t.raw_data) for t in graph.initializer) < 4096  # no weights inside the graph
    assert locations == {"model.onnx.data"}
    merged_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    assert (out / "model.onnx.data").stat().st_size < 1.1 * merged_bytes  # not 2x


def test_evaluate_runs_the_genai_folder_as_the_unmerged_model(llama, tmp_path):
    """``evaluate --onnx`` on an ORT GenAI folder: log-likelihood option scores equal the unmerged model's
    (fp32, within the runtime's noise). (Generation runs through ``generate``'s source, tested above.)"""
    base, ip, dp, folder, _ = llama
    records = [{"question": "What is red?", "options": ["the sky", "blood", "grass"], "answer": 1},
               {"question": "Which one is a fruit?", "options": ["apple", "stone"], "answer": 0}]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    scores = {}
    forms = {"genai": ["--onnx", folder], "unmerged": ["--model", base, "--index", ip, "--delta", dp]}
    for name, args in forms.items():
        out = tmp_path / f"{name}.jsonl"
        r = run_cli("evaluate", *args, "--data", data, "--scoring", "loglik", "--prompt-style", "lm-eval",
                    "--predictions", out, "--json", "-q")
        assert r.exit_code == 0, r.output
        scores[name] = [json.loads(line)["option_logprob"] for line in out.read_text().splitlines()]
        if name == "genai":
            assert "onnx-genai" in json.loads(r.stdout)["form"]
    for a, b in zip(scores["genai"], scores["unmerged"]):
        assert a == pytest.approx(b, abs=1e-3)
