"""check --generate N: greedy tokens of the unmerged model (base + bypass), the merged model and the
ONNX model with past must agree on fp32; a wrong merged weight is caught in one line naming the first
differing token.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from neuroada_tools.check.generation import first_difference, fresh_prompts
from neuroada_tools.check.run import run_check
from neuroada_tools.cli import main
from neuroada_tools.errors import ParityError
from neuroada_tools.export.merge import merge_to_folder
from neuroada_tools.generate.decode import generate_ids
from neuroada_tools.generate.sources import open_merged
from neuroada_tools.io.sidecar import DeltaSidecar, read_index, write_delta
from tests.genkit import random_delta
from tests.test_parity_inputs import _base_with_sidecars, _gpt2, _llama

N = 8


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def check_json(forms, *extra) -> tuple[int, dict, str]:
    r = run_cli("check", *forms.unmerged_args(), *extra, "--generate", N, "--json")
    return r.exit_code, json.loads(r.stdout), r.stderr


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_check_generate_passes_and_the_delta_changes_the_tokens(decoder_forms, name):
    f = decoder_forms(name)
    code, d, err = check_json(f, "--merged", f.merged, "--onnx", f.onnx, "--with-past")
    assert code == 0 and err == "", (d, err)
    g = d["generation"]
    assert g["passed"] and g["enforced"] and g["mismatch"] is None
    assert g["compared"] == ["merged_vs_unmerged", "onnx_with_past_vs_unmerged"]
    assert g["tokens"]["unmerged"] == g["tokens"]["merged"] == g["tokens"]["onnx_with_past"]
    assert all(1 <= len(t) <= N for t in g["tokens"]["unmerged"]) and max(map(len, g["tokens"]["unmerged"])) == N
    # not vacuous: the base alone decodes other tokens from the same prompts
    base = open_merged(f.base)
    model = base.new_session().model
    assert fresh_prompts(model, batch=3, seq=11, seed=1234, pad_id=base.pad_id) == g["prompts"]
    plain = [x.token_ids for x in generate_ids(base.new_session(), g["prompts"], N, eos_ids=g["eos_ids"],
                                               vocab=base.vocab)]
    assert plain != g["tokens"]["unmerged"]
    human = run_cli("check", *f.unmerged_args(), "--merged", f.merged, "--generate", N)
    assert human.exit_code == 0 and f"greedy generation, {N} new tokens x 3 prompts" in human.stdout


def test_check_generate_without_a_with_past_graph_reruns_model_onnx(decoder_forms, tmp_path):
    f = decoder_forms("gpt2")
    onnx = tmp_path / "onnx"
    shutil.copytree(f.onnx, onnx, ignore=shutil.ignore_patterns("model_with_past*"))
    r = run_check(f.base, f.index, f.delta, onnx_dir=onnx, generate=4)
    assert r.generation["compared"] == ["onnx_vs_unmerged"] and r.passed


def _perturb(folder: Path, name: str, scale: float) -> None:
    """Add ``scale`` x N(0, 1) to the tensor ``name`` of a (possibly sharded) safetensors folder."""
    index = folder / "model.safetensors.index.json"
    shard = folder / (json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors")
    tensors = load_file(shard)
    g = torch.Generator().manual_seed(5)
    tensors[name] = tensors[name] + scale * torch.randn(tensors[name].shape, generator=g)
    save_file(tensors, shard, metadata={"format": "pt"})


@pytest.mark.parametrize(("name", "tensor"), [("llama", "model.layers.1.mlp.down_proj.weight"),
                                              ("gpt2", "transformer.h.1.mlp.c_proj.weight")])
def test_a_perturbed_merged_weight_changes_the_tokens_and_fails_in_one_line(decoder_forms, tmp_path, name, tensor):
    f = decoder_forms(name)
    bad = tmp_path / "merged"
    shutil.copytree(f.merged, bad)
    _perturb(bad, tensor, 0.2)
    code, d, err = check_json(f, "--merged", bad)
    assert code == 1
    g = d["generation"]
    assert not g["passed"] and not d["passed"]
    p, i, a, b = first_difference(g["tokens"]["unmerged"], g["tokens"]["merged"])
    want = f"error: greedy tokens differ: merged vs unmerged, prompt {p + 1}, new token {i + 1} of {N}: " \
           f"unmerged {a}, merged {b}"
    assert err.strip().splitlines() == [want] and "Traceback" not in err
    assert a != b and int(a) == g["tokens"]["unmerged"][p][i]
    with pytest.raises(ParityError, match="greedy tokens differ: merged vs unmerged, prompt "):
        run_check(f.base, f.index, f.delta, merged_dir=bad, generate=N)


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_special_ids_outside_the_vocabulary_do_not_crash_generation(tmp_path, build):
    base, ip, dp = _base_with_sidecars(tmp_path, build)
    merge_to_folder(base, ip, dp, tmp_path / "merged")
    r = run_check(base, ip, dp, merged_dir=tmp_path / "merged", generate=6)
    assert r.passed and r.generation["eos_ids"] == []  # no EOS the model could produce: every row runs to 6
    assert all(len(t) == 6 for t in r.generation["tokens"]["unmerged"])
    source = open_merged(tmp_path / "merged")
    assert 0 <= source.pad_id < source.vocab and source.eos_ids == []
    prompts = [[3, 4, 5, 6, 7], [8], [9, 10, 11]]
    together = generate_ids(source.new_session(), prompts, 6, eos_ids=source.eos_ids, vocab=source.vocab)
    alone = [generate_ids(source.new_session(), [p], 6, eos_ids=source.eos_ids, vocab=source.vocab)[0] for p in prompts]
    assert together == alone


def test_low_precision_tokens_are_reported_not_enforced(fixture_models, tmp_path):
    ip, dp = random_delta(fixture_models["qwen2"], tmp_path)
    merge_to_folder(fixture_models["qwen2"], ip, dp, tmp_path / "merged")
    r = run_check(fixture_models["qwen2"], ip, dp, merged_dir=tmp_path / "merged", generate=4)
    assert r.dtype == "bf16" and r.generation["enforced"] is False and r.generation_passed


# --------------------------------------------------------------------------- merge --generate


def test_merge_generate_checks_the_tokens_of_what_it_wrote(decoder_forms, tmp_path):
    f = decoder_forms("llama")
    out = tmp_path / "merged"
    r = run_cli("merge", *f.unmerged_args(), "--to", "safetensors", "-o", out, "--generate", 4, "--json", "-q")
    assert r.exit_code == 0, r.stderr
    g = json.loads(r.stdout)["parity"]["generation"]
    assert g["passed"] and g["enforced"] and g["compared"] == ["merged_vs_unmerged"]
    assert g["tokens"]["merged"] == g["tokens"]["unmerged"] and max(map(len, g["tokens"]["merged"])) == 4
    human = run_cli("merge", *f.unmerged_args(), "-o", out, "--force", "--generate", 4, "-q")
    assert human.exit_code == 0 and "greedy generation, 4 new tokens x 3 prompts" in human.stdout


def test_merge_generate_is_refused_before_anything_is_written(decoder_forms, tmp_path):
    f = decoder_forms("llama")
    out = tmp_path / "merged"
    r = run_cli("merge", *f.unmerged_args(), "-o", out, "--no-check", "--generate", 4)
    assert r.exit_code == 2 and not out.exists()
    assert r.stderr.strip().splitlines() == [
        "error: --generate runs inside the parity check; leave out --no-check or --generate"]
    index = read_index(f.index)
    classifier = tmp_path / "cls.delta.safetensors"
    write_delta(classifier, DeltaSidecar(index.digest, {n: torch.zeros(t.shape) for n, t in index.indices.items()},
                                         {}, "sequence-classification", {}))
    r = run_cli("merge", "--model", f.base, "--index", f.index, "--delta", classifier, "-o", out, "--generate", 4)
    assert r.exit_code == 2 and not out.exists()
    assert r.stderr.strip().splitlines() == [
        f"error: {classifier}: --generate needs a causal-LM delta; this one is for sequence-classification"]
