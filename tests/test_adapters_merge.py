"""The adapter API's merge=True (equal to ``neuroada-tools merge``, un-merged bit for bit), combine,
save_delta, and task heads that switch with their adapter."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

import neuroada_tools
from neuroada_tools.errors import ModelError, SidecarError
from neuroada_tools.export.merge import merge_to_folder
from neuroada_tools.io.sidecar import DeltaSidecar, read_delta, write_delta
from neuroada_tools.train import bypass
from tests.adapterkit import assert_same, bits, index_file, load, logits, random_delta, snapshot

MERGED = {"llama": 4, "gpt2": 3, "qwen2": 4, "llama-fp16": 4}  # fp32 sharded, Conv1D, bf16, fp16


@pytest.fixture(scope="module")
def side(fixture_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("merge")
    out = {}
    for arch, k in MERGED.items():
        ipath = d / f"{arch}.index.safetensors"
        index = index_file(fixture_models[arch], ipath, k)
        dpath = d / f"{arch}.delta.safetensors"
        random_delta(index, dpath, seed=k, scale=0.05)
        out[arch] = (fixture_models[arch], ipath, index, dpath)
    return out


@pytest.mark.parametrize("arch", sorted(MERGED))
def test_merge_true_equals_the_merge_command_and_remove_unmerges_bit_for_bit(side, arch, tmp_path):
    model_dir, ipath, index, dpath = side[arch]
    model = load(model_dir, dtype="auto")
    before = snapshot(model)
    fused = load(model_dir, dtype="auto")
    bypass.attach(fused, index, read_delta(dpath, index))
    neuroada_tools.apply(model, ipath, dpath, merge=True)
    assert neuroada_tools.list_adapters(model) == {"default": "merged"}
    assert not any(type(m).__name__.startswith("NeuroAda") for m in model.modules())
    merge_to_folder(model_dir, ipath, dpath, tmp_path / "merged")
    files = sorted((tmp_path / "merged").glob("*.safetensors"))
    on_disk = {n: t for f in files for n, t in load_file(f).items()}
    state = model.state_dict()
    assert set(on_disk) <= set(state)
    for n, t in on_disk.items():
        assert torch.equal(bits(state[n]), bits(t)), n
    assert torch.equal(logits(model), logits(fused))  # the fused bypass writes the same entries
    neuroada_tools.remove(model)
    assert_same(model, before)


def test_a_refused_merge_changes_nothing(side):
    model_dir, ipath, index, dpath = side["llama-fp16"]
    model = load(model_dir, dtype="auto")
    before = snapshot(model)
    delta = read_delta(dpath, index)
    last = sorted(delta.deltas)[-1]
    delta.deltas[last][2, 1] = 1e6  # overflows fp16, in the last tensor: the others were merged first
    with pytest.raises(SidecarError, match=re.escape(f"{last!r}: merged value W[2, ")):
        neuroada_tools.apply(model, index, delta, merge=True)
    assert neuroada_tools.list_adapters(model) == {}
    assert_same(model, before)


def test_merged_adapter_saves_its_delta(side, tmp_path):
    model_dir, ipath, index, dpath = side["llama"]
    model = load(model_dir)
    neuroada_tools.apply(model, ipath, dpath, merge=True)
    neuroada_tools.save_delta(model, tmp_path / "again.delta.safetensors")
    again, first = read_delta(tmp_path / "again.delta.safetensors", index), read_delta(dpath, index)
    assert all(torch.equal(again.deltas[n], first.deltas[n]) for n in first.deltas)


# ---------------------------------------------------------------- combine


def test_combine_is_a_weighted_sum_of_deltas_of_one_index(side, tmp_path):
    _, ipath, index, dpath = side["llama"]
    a = read_delta(dpath, index)
    b = random_delta(index, tmp_path / "b.delta.safetensors", seed=5)
    mix = neuroada_tools.combine([dpath, b], [0.5, -2.0])
    assert isinstance(mix, DeltaSidecar) and mix.index_digest == index.digest
    for n in index.indices:
        want = (0.5 * a.deltas[n].double() - 2.0 * b.deltas[n].double()).float()
        assert torch.equal(mix.deltas[n], want), n
    assert [c["weight"] for c in mix.info["combined"]] == [0.5, -2.0]
    assert mix.info["combined"][0]["delta"] == dpath.name and mix.info["combined"][1]["delta"] == "delta 1"
    write_delta(tmp_path / "mix.delta.safetensors", mix)
    assert read_delta(tmp_path / "mix.delta.safetensors", index).index_digest == index.digest
    # a worked example: [[1, 2]] * 0.5 + [[3, -1]] * 0.25 = [[1.25, 0.75]]
    one = DeltaSidecar("0" * 64, {"w": torch.tensor([[1.0, 2.0]])})
    two = DeltaSidecar("0" * 64, {"w": torch.tensor([[3.0, -1.0]])})
    assert neuroada_tools.combine([one, two], [0.5, 0.25]).deltas["w"].tolist() == [[1.25, 0.75]]


def test_combine_refuses_deltas_of_different_indexes_in_one_line(side):
    _, _, _, llama_delta = side["llama"]
    _, _, _, gpt2_delta = side["gpt2"]
    a, b = read_delta(llama_delta), read_delta(gpt2_delta)
    with pytest.raises(SidecarError) as e:
        neuroada_tools.combine([llama_delta, gpt2_delta], [1.0, 1.0])
    assert str(e.value) == (f"combine: llama.delta.safetensors was made on index {a.index_digest[:12]}... but "
                            f"gpt2.delta.safetensors on {b.index_digest[:12]}...; only deltas of the same index can "
                            "be combined")
    one = DeltaSidecar("0" * 64, {"w": torch.zeros(1, 2)}, dense={"head": torch.zeros(2)})
    two = DeltaSidecar("0" * 64, {"w": torch.zeros(1, 2)})
    with pytest.raises(SidecarError, match=r"^combine: delta 0 has dense tensor 'head', delta 1 does not$"):
        neuroada_tools.combine([one, two], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"^combine: 2 deltas but 1 weights$"):
        neuroada_tools.combine([one, two], [1.0])


def test_apply_a_combination(side):
    model_dir, ipath, index, dpath = side["llama"]
    mix = neuroada_tools.combine([dpath, dpath], [0.25, 0.25])
    model = neuroada_tools.apply(load(model_dir), ipath, mix)
    half = read_delta(dpath, index)
    half.deltas = {n: t * 0.5 for n, t in half.deltas.items()}
    assert torch.equal(logits(model), logits(neuroada_tools.apply(load(model_dir), ipath, half)))


# ---------------------------------------------------------------- save_delta and heads


def test_save_delta_round_trip_atomic_and_of_an_inactive_adapter(side, tmp_path):
    model_dir, ipath, index, dpath = side["llama"]
    model = load(model_dir)
    neuroada_tools.apply(model, ipath, dpath, name="a")
    neuroada_tools.apply(model, ipath, name="fresh")
    out = tmp_path / "a.delta.safetensors"
    out.write_bytes(b"old")
    neuroada_tools.save_delta(model, out, name="a", info={"note": "x"})  # inactive; replaces the old file
    saved, first = read_delta(out, index), read_delta(dpath, index)
    assert all(torch.equal(saved.deltas[n], first.deltas[n]) for n in first.deltas)
    assert saved.info["note"] == "x" and saved.task == "causal-lm" and saved.dense == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.delta.safetensors"]  # no temporary left
    zeros = neuroada_tools.save_delta(model, tmp_path / "fresh.delta.safetensors")  # the active one
    assert all(not t.any() for t in zeros.deltas.values())
    layer = next(m for m in model.modules() if hasattr(m, "neuroada_delta"))
    with torch.no_grad():
        layer.neuroada_delta[0, 0] = float("nan")
    with pytest.raises(ModelError, match=re.escape(f"save_delta 'fresh': {layer.neuroada_name!r} holds NaN or Inf; "
                                                   "not saving it")):
        neuroada_tools.save_delta(model, tmp_path / "nan.delta.safetensors")
    assert not (tmp_path / "nan.delta.safetensors").exists()


def test_heads_belong_to_their_adapter(fixture_models, tmp_path):
    model_dir = fixture_models["bert-cls"]
    ipath = tmp_path / "bert.index.safetensors"
    index = index_file(model_dir, ipath, 2)
    model = load(model_dir, "classification")
    before, base = snapshot(model), logits(model)
    neuroada_tools.apply(model, ipath, name="a", head=True)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad and "neuroada" not in n)
    assert trainable == ["classifier.bias", "classifier.weight"]
    with torch.no_grad():  # "training"
        model.classifier.weight.add_(0.25)
        for m in model.modules():
            if hasattr(m, "neuroada_delta"):
                m.neuroada_delta.normal_(0, 0.05)
    trained = logits(model)
    saved = neuroada_tools.save_delta(model, tmp_path / "a.delta.safetensors")
    assert sorted(saved.dense) == ["classifier.bias", "classifier.weight"]
    assert saved.task == "classification" and saved.info["num_labels"] == 2 and len(saved.info["label_names"]) == 2
    assert torch.equal(saved.dense["classifier.weight"], model.classifier.weight.detach())

    neuroada_tools.apply(model, ipath, random_delta(index, None, seed=3), name="b")  # no head: the base head
    assert torch.equal(model.classifier.weight, before["classifier.weight"])
    assert not model.classifier.weight.requires_grad
    neuroada_tools.set_active(model, "a")
    assert torch.equal(logits(model), trained) and model.classifier.weight.requires_grad
    # the saved delta carries the head to another model, and `merge` takes it
    other = neuroada_tools.apply(load(model_dir, "classification"), ipath, tmp_path / "a.delta.safetensors")
    assert torch.equal(logits(other), trained)
    merge_to_folder(model_dir, ipath, tmp_path / "a.delta.safetensors", tmp_path / "merged")
    merged = load(tmp_path / "merged", "classification")
    assert torch.allclose(logits(merged), trained, atol=1e-5)
    neuroada_tools.remove(model)
    assert_same(model, before)
    assert torch.equal(logits(model), base)
    assert all(p.requires_grad for p in model.parameters())


def test_head_true_refused_where_there_is_no_head(fixture_models, tmp_path):
    from transformers import AutoModel

    model_dir = fixture_models["bert-base"]
    ipath = tmp_path / "bert-base.index.safetensors"
    index_file(model_dir, ipath, 2)
    model = AutoModel.from_pretrained(str(model_dir))
    with pytest.raises(ModelError, match=r"^head=True: BertModel has no task head outside 'bert'$"):
        neuroada_tools.apply(model, ipath, head=True)
    assert neuroada_tools.list_adapters(model) == {}
