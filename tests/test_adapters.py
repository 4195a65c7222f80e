"""The adapter API on the fixture models: apply, set_active, remove (bit for bit), and its refusals."""

from __future__ import annotations

import re

import pytest
import torch

import neuroada_tools
from neuroada_tools.adapters import registry as reg_mod
from neuroada_tools.errors import FingerprintError, ModelError, SidecarError
from neuroada_tools.io.sidecar import DeltaSidecar, read_delta
from neuroada_tools.train import bypass
from tests.adapterkit import assert_same, index_file, load, logits, random_delta, snapshot

ARCHS = {  # fixture -> (task, k)
    "llama": ("causal-lm", 4),
    "gpt2": ("causal-lm", 3),  # Conv1D: [in, out] weights
    "qwen2": ("causal-lm", 4),  # bf16
    "bert-cls": ("classification", 2),  # index names carry the "bert." prefix of the saved task model
}


@pytest.fixture(scope="module")
def side(fixture_models, tmp_path_factory):
    """name -> (model folder, index path, index, {"a": delta path, "b": ...}) per fixture, plus a
    second index of the llama (k=2) with its own delta."""
    d = tmp_path_factory.mktemp("adapters")
    out = {}
    for arch, (_, k) in ARCHS.items():
        ipath = d / f"{arch}.index.safetensors"
        index = index_file(fixture_models[arch], ipath, k)
        deltas = {}
        for i, name in enumerate(("a", "b")):
            deltas[name] = d / f"{arch}.{name}.delta.safetensors"
            random_delta(index, deltas[name], seed=10 * i + k)
        out[arch] = (fixture_models[arch], ipath, index, deltas)
    ipath = d / "llama.k2.index.safetensors"
    index = index_file(fixture_models["llama"], ipath, 2, include=["q_proj", "down_proj"])
    cpath = d / "llama.k2.c.delta.safetensors"
    random_delta(index, cpath, seed=99, scale=0.2)
    out["llama-k2"] = (fixture_models["llama"], ipath, index, {"c": cpath})
    return out


def _reference(model_dir, task, index, delta_path):
    """Logits of a fresh model with the low-level bypass attached to ``delta_path``."""
    model = load(model_dir, task)
    bypass.attach(model, index, read_delta(delta_path, index))
    return logits(model)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_apply_computes_the_bypass_and_remove_restores_the_base_bit_for_bit(side, arch):
    model_dir, ipath, index, deltas = side[arch]
    task = ARCHS[arch][0]
    model = load(model_dir, task)
    before, flags = snapshot(model), {n: p.requires_grad for n, p in model.named_parameters()}
    base = logits(model)
    assert neuroada_tools.apply(model, ipath, deltas["a"]) is model
    assert neuroada_tools.list_adapters(model) == {"default": "active"}
    assert torch.equal(logits(model), _reference(model_dir, task, index, deltas["a"]))
    assert not torch.equal(logits(model), base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".neuroada_delta") for n in trainable)
    assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) == index.trainable_parameters()
    neuroada_tools.remove(model)
    assert_same(model, before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert neuroada_tools.list_adapters(model) == {}
    assert reg_mod.REGISTRY_ATTR not in model.__dict__
    assert not any("NeuroAda" in type(m).__name__ for m in model.modules())
    assert torch.equal(logits(model), base)


def test_zero_delta_apply_trains_and_objects_work_as_well_as_paths(side):
    model_dir, ipath, index, _ = side["llama"]
    model = load(model_dir)
    base = logits(model)
    neuroada_tools.apply(model, index)  # the object, no delta: zeros
    assert torch.equal(logits(model), base)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(3, 60, (2, 9))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert any(bool(p.abs().sum() > 0) for p in params)
    assert not torch.equal(logits(model.eval()), base)


def test_set_active_switches_deltas_and_indexes_without_copying_weights(side):
    model_dir, ipath, index, deltas = side["llama"]
    _, ipath2, index2, deltas2 = side["llama-k2"]
    ref = {n: _reference(model_dir, "causal-lm", index, p) for n, p in deltas.items()}
    ref["c"] = _reference(model_dir, "causal-lm", index2, deltas2["c"])
    model = load(model_dir)
    before, base = snapshot(model), logits(model)
    storage = {n: p.data_ptr() for n, p in model.named_parameters()}
    neuroada_tools.apply(model, ipath, deltas["a"], name="a")
    neuroada_tools.apply(model, ipath, deltas["b"], name="b")
    neuroada_tools.apply(model, ipath2, deltas2["c"], name="c")
    assert neuroada_tools.list_adapters(model) == {"a": "inactive", "b": "inactive", "c": "active"}
    assert torch.equal(logits(model), ref["c"])
    for name in ("a", "b", "a", "c", "b", "c", "a"):  # same index (swap) and another index (re-attach)
        neuroada_tools.set_active(model, name)
        assert torch.equal(logits(model), ref[name]), name
    neuroada_tools.set_active(model, None)
    assert torch.equal(logits(model), base)
    assert_same(model, before)
    # the weights were never copied: every base parameter keeps its storage
    assert {n: p.data_ptr() for n, p in model.named_parameters() if n in storage} == storage
    # each adapter costs its own [d_out, k] fp32 deltas; adapters of one index share its rows
    reg = reg_mod.registry(model)
    for name, idx in (("a", index), ("b", index), ("c", index2)):
        held = reg.adapters[name].params
        assert {n: tuple(p.shape) for n, p in held.items()} == {n: tuple(t.shape) for n, t in idx.indices.items()}
        assert all(p.dtype == torch.float32 for p in held.values())
    assert reg.adapters["a"].index is reg.adapters["b"].index
    assert reg.base_head == {}
    neuroada_tools.remove(model)
    assert_same(model, before)


def test_an_optimizer_keeps_its_adapter_across_switches(side):
    model_dir, ipath, _, deltas = side["llama"]
    model = load(model_dir)
    neuroada_tools.apply(model, ipath, name="a")
    params_a = [p for p in model.parameters() if p.requires_grad]
    neuroada_tools.apply(model, ipath, deltas["b"], name="b")
    b_values = {n: p.detach().clone() for n, p in reg_mod.registry(model).adapters["b"].params.items()}
    assert not any(p.requires_grad for p in params_a)  # inactive: frozen, and not in the model
    assert not any(any(p is q for q in params_a) for p in model.parameters())
    neuroada_tools.set_active(model, "a")
    live = [p for p in model.parameters() if p.requires_grad]
    assert len(live) == len(params_a) and all(p is q for p, q in zip(live, params_a))
    opt = torch.optim.SGD(params_a, lr=1.0)
    ids = torch.randint(3, 60, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert any(bool(p.abs().sum() > 0) for p in params_a)
    for n, p in reg_mod.registry(model).adapters["b"].params.items():  # b untouched
        assert torch.equal(p, b_values[n])


def test_remove_one_adapter_keeps_the_others(side):
    model_dir, ipath, index, deltas = side["llama"]
    model = load(model_dir)
    before, flags = snapshot(model), {n: p.requires_grad for n, p in model.named_parameters()}
    neuroada_tools.apply(model, ipath, deltas["a"], name="a")
    neuroada_tools.apply(model, ipath, deltas["b"], name="b")
    neuroada_tools.remove(model, "b")  # the active one: none is active after, the model is the base
    assert neuroada_tools.list_adapters(model) == {"a": "inactive"}
    assert_same(model, before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    neuroada_tools.set_active(model, "a")
    assert torch.equal(logits(model), _reference(model_dir, "causal-lm", index, deltas["a"]))
    neuroada_tools.remove(model, "a")
    assert neuroada_tools.list_adapters(model) == {}
    assert_same(model, before)
    neuroada_tools.remove(model)  # nothing left: a no-op


# ---------------------------------------------------------------- refusals


def _unchanged(model, before_logits, adapters):
    assert neuroada_tools.list_adapters(model) == adapters
    assert torch.equal(logits(model), before_logits)


def test_refuses_an_index_of_another_base_naming_the_tensor(side):
    model_dir, ipath, _, deltas = side["llama"]
    model = load(model_dir)
    neuroada_tools.apply(model, ipath, deltas["a"], name="a")
    with torch.no_grad():  # same shapes, another base: fine-tuning moves every row
        model.model.layers[1].mlp.gate_proj.weight[8:16] *= 1.01
    now = logits(model)
    with pytest.raises(FingerprintError, match=re.escape(
            "'model.layers.1.mlp.gate_proj.weight' differs from the base the index was made from "
            "(fingerprint mismatch)")):
        neuroada_tools.apply(model, ipath, deltas["b"], name="b")
    _unchanged(model, now, {"a": "active"})


def test_refuses_a_model_lacking_a_tensor_and_an_index_of_another_architecture(side):
    model_dir, _, _, _ = side["llama"]
    _, gpt2_index, _, _ = side["gpt2"]
    model = load(model_dir)
    model.name_or_path = model.config._name_or_path = ""  # no checkpoint folder: everything is checked in memory
    with pytest.raises(ModelError, match=r"^index tensor 'transformer\.h\.0\.attn\.c_attn\.weight': the model has "
                                         r"no parameter of that name$"):
        neuroada_tools.apply(model, gpt2_index)
    assert neuroada_tools.list_adapters(model) == {}


def test_refuses_a_delta_of_another_index_or_shape_naming_it(side):
    model_dir, ipath, index, deltas = side["llama"]
    _, _, _, deltas2 = side["llama-k2"]
    model = load(model_dir)
    base = logits(model)
    with pytest.raises(SidecarError, match=r"^llama\.k2\.c\.delta\.safetensors: made for index sha256 [0-9a-f]{12}"
                                           r"\.\.\., but the given index is [0-9a-f]{12}\.\.\.$"):
        neuroada_tools.apply(model, ipath, deltas2["c"])
    bad = read_delta(deltas["a"], index)
    name = sorted(bad.deltas)[3]
    bad.deltas[name] = bad.deltas[name][:, :2]
    with pytest.raises(SidecarError, match=re.escape(f"delta: {name!r}: shape [{bad.deltas[name].shape[0]}, 2] does "
                                                     f"not match the index [{bad.deltas[name].shape[0]}, 4]")):
        neuroada_tools.apply(model, index, bad)
    head = DeltaSidecar(index.digest, read_delta(deltas["a"]).deltas, dense={"score.weight": torch.zeros(2, 64)})
    with pytest.raises(ModelError, match=r"^delta: dense tensor 'score\.weight': the model has no parameter of that "
                                         r"name$"):
        neuroada_tools.apply(model, index, head)
    _unchanged(model, base, {})


def test_refusals_of_names_and_states(side):
    model_dir, ipath, index, deltas = side["llama"]
    model = load(model_dir)
    with pytest.raises(ModelError, match=r"^model has no NeuroAda adapters; call neuroada_tools\.apply\(\) first$"):
        neuroada_tools.set_active(model, "a")
    with pytest.raises(ModelError, match=r"^no NeuroAda adapter named 'a' \(adapters: none\)$"):
        neuroada_tools.remove(model, "a")
    with pytest.raises(ModelError, match=r"^model has no NeuroAda adapters; call neuroada_tools\.apply\(\) first$"):
        neuroada_tools.save_delta(model, "x.delta.safetensors")
    neuroada_tools.apply(model, ipath, deltas["a"], name="a")
    with pytest.raises(ModelError, match=r"^apply: an adapter named 'a' exists already; remove\(model, 'a'\) it or "
                                         r"pick another name$"):
        neuroada_tools.apply(model, ipath, deltas["b"], name="a")
    with pytest.raises(ModelError, match=r"^no NeuroAda adapter named 'z' \(adapters: 'a'\)$"):
        neuroada_tools.set_active(model, "z")
    with pytest.raises(ModelError, match=r"^apply 'm': cannot merge while adapters 'a' are applied \(a merged model "
                                         r"is another base\); remove them first$"):
        neuroada_tools.apply(model, ipath, deltas["b"], name="m", merge=True)
    neuroada_tools.set_active(model, None)
    with pytest.raises(ModelError, match=r"^save_delta: no adapter is active; pass name= \(adapters: 'a'\)$"):
        neuroada_tools.save_delta(model, "x.delta.safetensors")
    neuroada_tools.remove(model)

    neuroada_tools.apply(model, ipath, deltas["a"], name="m", merge=True)
    with pytest.raises(ModelError, match=r"^apply 'b': adapter 'm' is merged into the weights, which are no longer "
                                         r"the base an index was made from; remove\(model, 'm'\) first$"):
        neuroada_tools.apply(model, ipath, deltas["b"], name="b")
    with pytest.raises(ModelError, match=r"^adapter 'm' is merged into the weights; remove\(model, 'm'\) un-merges "
                                         r"it$"):
        neuroada_tools.set_active(model, None)
    with pytest.raises(ModelError, match=r"^apply 'x': merge=True needs a delta to merge$"):
        neuroada_tools.apply(load(model_dir), ipath, name="x", merge=True)
    neuroada_tools.remove(model)

    bypass.attach(model, index)
    with pytest.raises(ModelError, match=r"^model has NeuroAda bypasses attached by bypass\.attach\(\); call "
                                         r"bypass\.detach\(\) first$"):
        neuroada_tools.apply(model, ipath)
    bypass.detach(model)


def test_a_weight_loaded_narrower_than_the_base_is_read_from_the_checkpoint(side):
    model_dir, ipath, index, deltas = side["llama"]
    model = load(model_dir, dtype=torch.bfloat16)  # the fp32 base in bf16: the fingerprints need the file
    neuroada_tools.apply(model, ipath, deltas["a"])  # model.name_or_path is the folder: read from there
    neuroada_tools.remove(model)
    model.name_or_path = model.config._name_or_path = ""
    name = sorted(index.indices)[0]
    with pytest.raises(FingerprintError, match=re.escape(
            f"model: {name!r} is loaded as bfloat16, which does not hold the F32 values the index was made from")):
        neuroada_tools.apply(model, ipath, deltas["a"])
    neuroada_tools.apply(model, ipath, deltas["a"], base=model_dir)  # or named explicitly
    assert neuroada_tools.list_adapters(model) == {"default": "active"}


def test_a_mode_set_on_the_bypass_survives_switching(side):
    model_dir, ipath, index, deltas = side["llama"]
    _, ipath2, _, deltas2 = side["llama-k2"]
    model = load(model_dir)
    neuroada_tools.apply(model, ipath, deltas["a"], name="a")
    neuroada_tools.apply(model, ipath2, deltas2["c"], name="c")
    bypass.set_mode(model, "reference")
    for name in ("a", "c"):  # another index: detached and attached again, in the same mode
        neuroada_tools.set_active(model, name)
        assert {m.neuroada_mode for m in reg_mod.layers(model).values()} == {"reference"}
    ref = _reference(model_dir, "causal-lm", index, deltas["a"])
    neuroada_tools.set_active(model, "a")
    torch.testing.assert_close(logits(model), ref, rtol=1e-5, atol=1e-5)
