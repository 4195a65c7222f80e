"""The NeuroAda bypass: gradients against the naive formulation, surgery on tiny HF models, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from neuroada_tools.train import bypass
from neuroada_tools.train.bypass import layer as bypass_layer
from neuroada_tools.train.bypass import ops as bypass_ops
from neuroada_tools.train.bypass import (
    attach,
    count_trainable,
    deltas,
    detach,
    make_delta_sidecar,
    merge_in_place,
    set_mode,
    trainable_parameters,
)
from neuroada_tools.errors import ModelError, SidecarError
from neuroada_tools.index.criteria import select
from neuroada_tools.io.sidecar import IndexSidecar, TensorEntry

_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def make_index(model: nn.Module, k: int, want=lambda name, module: True, strip: str = "") -> IndexSidecar:
    """Index every Linear/Conv1D weight accepted by ``want``; names lose the ``strip`` prefix."""
    indices, entries = {}, {}
    for mname, m in model.named_modules():
        if not isinstance(m, (nn.Linear, Conv1D)) or not want(mname, m):
            continue
        w = m.weight.detach()
        layout = "out_in" if isinstance(m, nn.Linear) else "in_out"
        logical = w if layout == "out_in" else w.t()
        name = f"{mname}.weight".removeprefix(strip)
        indices[name] = select(logical, min(k, logical.shape[1]))
        entries[name] = TensorEntry(tuple(logical.shape), layout, _DTYPE_NAMES[w.dtype], "0" * 64)
    return IndexSidecar(k=k, criterion="magnitude", indices=indices, entries=entries)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _layer(kind: str, d_in: int, d_out: int, bias: bool) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d_in, d_out, bias=bias)
    m = Conv1D(d_out, d_in)
    nn.init.normal_(m.bias)
    if not bias:
        m.bias = None
    return m


def _naive(layer: nn.Module, kind: str, idx: torch.Tensor, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """linear(x, W + scatter(delta)) with standard autograd, W being the clean base weight."""
    w = layer.weight.detach()
    logical = w if kind == "linear" else w.t()
    s = torch.zeros_like(logical).scatter(1, idx.long(), delta)
    return F.linear(x, logical + s, layer.bias.detach() if layer.bias is not None else None)


# ---------------------------------------------------------------- single layer


@pytest.mark.parametrize("backend", ["native", "sampled_addmm", "columns", "auto"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(7,), (2, 5)])
@pytest.mark.parametrize("k", [1, 12])
def test_grads_match_naive(monkeypatch, backend, kind, bias, lead, k):
    monkeypatch.setattr(bypass_ops, "SDDMM_BACKEND", backend)
    torch.manual_seed(0)
    d_in, d_out = 12, 9
    layer = _layer(kind, d_in, d_out, bias)
    base = copy.deepcopy(layer)
    model = nn.Sequential(layer)
    index = make_index(model, k)
    (name,) = index.indices
    (delta,) = attach(model, index).values()
    with torch.no_grad():
        delta.normal_()
    x = torch.randn(*lead, d_in, requires_grad=True)
    g = torch.randn(*lead, d_out)
    model(x).backward(g)
    gx, gd = x.grad.clone(), delta.grad.clone()

    d2 = delta.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y2 = _naive(base, kind, index.indices[name], d2, x2)
    y2.backward(g)
    assert rel_err(gd, d2.grad) <= 1e-5
    assert rel_err(gx, x2.grad) <= 1e-5
    assert gd.dtype == torch.float32
    with torch.no_grad():
        assert rel_err(model(x), y2) <= 1e-5
        set_mode(model, "reference")
        assert rel_err(model(x), y2) <= 1e-5


@pytest.mark.parametrize("backend", ["native", "sampled_addmm", "columns", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sddmm_blocks_and_dtypes(monkeypatch, backend, dtype):
    monkeypatch.setattr(bypass_ops, "SDDMM_BACKEND", backend)
    monkeypatch.setattr(bypass_ops, "_L3_FLOATS", 1000)
    monkeypatch.setattr(bypass_ops, "_L2_FLOATS", 1000)
    torch.manual_seed(8)
    T, d_in, d_out, k = 600, 16, 8, 5  # with the block threshold lowered: several blocks, the last short
    g, x = torch.randn(T, d_out).to(dtype), torch.randn(T, d_in).to(dtype)
    idx = torch.stack([torch.randperm(d_in)[:k].sort().values for _ in range(d_out)]).int()
    got = bypass.sddmm(g, x, idx)
    want = (g.double().t() @ x.double()).gather(1, idx.long())
    assert got.dtype == torch.float32
    assert rel_err(got.double(), want) <= 1e-6


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_reference_grads_and_forward_agree_with_fused(kind):
    torch.manual_seed(1)
    model = nn.Sequential(_layer(kind, 16, 8, True))
    (delta,) = attach(model, make_index(model, 3)).values()
    with torch.no_grad():
        delta.normal_()
    x = torch.randn(3, 4, 16, requires_grad=True)
    out = {}
    for mode in ("fused", "reference"):
        set_mode(model, mode)
        x.grad = delta.grad = None
        y = model(x)
        y.square().sum().backward()
        out[mode] = (y.detach(), x.grad.clone(), delta.grad.clone())
    for a, b in zip(out["fused"], out["reference"]):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_detach_restores_base_bit_for_bit(dtype, kind):
    torch.manual_seed(2)
    model = nn.Sequential(_layer(kind, 16, 8, True)).to(dtype)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    cls = type(model[0])
    (delta,) = attach(model, make_index(model, 4)).values()
    assert delta.dtype == torch.float32
    opt = torch.optim.SGD([delta], lr=0.5)
    for _ in range(2):
        model(torch.randn(5, 16, dtype=dtype)).sum().backward()
        assert delta.grad.dtype == torch.float32
        opt.step()
    model(torch.randn(5, 16, dtype=dtype))  # leave the weight holding W0 + delta
    assert not torch.equal(model[0].weight, before["0.weight"])
    detach(model)
    after = model.state_dict()
    assert list(after) == list(before)
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[dtype]
    for n in before:
        assert torch.equal(after[n].view(ints), before[n].view(ints)), n
    assert type(model[0]) is cls
    assert not hasattr(model[0], "neuroada_delta")
    assert all(p.requires_grad for p in model.parameters())


def test_state_dict_keys_and_values_during_training():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4))
    base = {n: t.clone() for n, t in model.state_dict().items()}
    (d0, d1) = attach(model, make_index(model, 2)).values()
    with torch.no_grad():
        d0.fill_(1.0)
    model(torch.randn(3, 8))  # weights now hold W0 + delta at the selected positions
    sd = model.state_dict()
    assert set(sd) == set(base) | {"0.neuroada_delta", "1.neuroada_delta"}
    for n in base:
        assert torch.equal(sd[n], base[n]), n
    # the forward after state_dict() still sees the delta
    x = torch.randn(3, 8)
    set_mode(model, "reference")
    ref = model(x)
    set_mode(model, "fused")
    assert rel_err(model(x), ref) <= 1e-6


def test_state_dict_between_forward_and_backward_keeps_grads_right():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(8, 6))
    (delta,) = attach(model, make_index(model, 3)).values()
    with torch.no_grad():
        delta.normal_()
    x = torch.randn(4, 8, requires_grad=True)
    model(x).square().sum().backward()
    want = (x.grad.clone(), delta.grad.clone())
    x.grad = delta.grad = None
    y = model(x).square().sum()
    model.state_dict()  # restores the base weight in place
    y.backward()
    assert torch.equal(x.grad, want[0]) and torch.equal(delta.grad, want[1])


def test_load_state_dict_recaptures_base():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(8, 6))
    other = {n: torch.randn_like(t) for n, t in model.state_dict().items()}
    attach(model, make_index(model, 3))
    model(torch.randn(2, 8))
    sd = model.state_dict()
    model.load_state_dict({**other, "0.neuroada_delta": torch.full_like(sd["0.neuroada_delta"], 0.5)})
    x = torch.randn(2, 8)
    fused = model(x)
    set_mode(model, "reference")
    assert rel_err(fused, model(x)) <= 1e-6
    detach(model)
    for n, t in other.items():
        assert torch.equal(model.state_dict()[n], t), n


def test_to_dtype_keeps_deltas_fp32():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(8, 6))
    base_bf16 = model[0].weight.detach().to(torch.bfloat16)
    (delta,) = attach(model, make_index(model, 2)).values()
    with torch.no_grad():
        delta.fill_(1e-3)  # below bf16 resolution near most weights: lost if the delta were cast
    model(torch.randn(2, 8)).sum().backward()
    model.to(torch.bfloat16)
    assert delta.dtype == torch.float32 and delta.grad.dtype == torch.float32
    assert float(delta.detach()[0, 0]) == pytest.approx(1e-3)
    assert model[0].neuroada_w0.dtype == torch.bfloat16
    model(torch.randn(2, 8, dtype=torch.bfloat16)).sum().backward()
    detach(model)
    assert torch.equal(model[0].weight.view(torch.int16), base_bf16.view(torch.int16))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_refresh_skipped_only_while_weight_and_delta_are_unchanged(kind):
    """A forward with the delta unchanged since the last one writes nothing into W; every way the
    delta or W can change (fused optimizer step, ``.data`` write, in-place write to W, a dtype
    move) makes the next forward write again, so outputs always equal the reference formulation."""
    torch.manual_seed(12)
    model = nn.Sequential(_layer(kind, 10, 7, bias=True))
    (delta,) = attach(model, make_index(model, 3)).values()
    layer, x = model[0], torch.randn(4, 10)

    def agrees() -> bool:
        fused = model(x)
        set_mode(model, "reference")
        ref = model(x)
        set_mode(model, "fused")
        return rel_err(fused, ref) <= 1e-6

    model(x)
    v = layer.weight._version
    model(x)
    model(x).sum().backward()
    if bypass_ops.native.kernel() is not None:  # the skip needs the compiled compare
        assert layer.weight._version == v  # nothing written: the delta did not change

    torch.optim.AdamW([delta], lr=0.1, fused=True).step()  # fused: does not bump delta._version
    assert agrees()
    with torch.no_grad():
        delta.data[1, 2] = 0.25  # no version bump either
    assert agrees()
    model(x)
    assert float(layer._neuroada_logical(layer.weight)[1, layer.neuroada_idx[1, 2]]) == pytest.approx(
        float(layer.neuroada_w0[1, 2]) + 0.25)
    delta.data = delta.data + 0.5  # a new storage for the delta: the kept record must not be trusted
    model(x)
    assert float(layer._neuroada_logical(layer.weight)[1, layer.neuroada_idx[1, 2]]) == pytest.approx(
        float(layer.neuroada_w0[1, 2]) + 0.75)
    with torch.no_grad():
        layer._neuroada_logical(layer.weight).fill_(3.0)  # an in-place write to W (version bump)
    model(x)
    w = layer._neuroada_logical(layer.weight)
    assert torch.equal(w.gather(1, layer.neuroada_idx.long()), layer.neuroada_w0 + delta.detach())
    with torch.no_grad():
        delta.data[0, 0] = -0.0
    model(x)
    bits = w.gather(1, layer.neuroada_idx.long())[0, 0].view(torch.int32)
    assert bits == (layer.neuroada_w0[0, 0] + torch.tensor(-0.0)).view(torch.int32)  # bits compared, not values
    model.to(torch.float64)
    x = x.double()
    assert agrees()


def test_optimizer_step_between_forward_and_backward_is_refused():
    model = nn.Sequential(nn.Linear(8, 6))
    (delta,) = attach(model, make_index(model, 2)).values()
    y = model(torch.randn(2, 8)).sum()
    with torch.no_grad():
        delta.add_(1.0)
    with pytest.raises(RuntimeError, match="modified between forward and backward"):
        y.backward()


def test_merge_in_place_equals_fused_forward():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(8, 6), nn.GELU(), Conv1D(5, 6)).to(torch.bfloat16)
    (d0, d1) = attach(model, make_index(model, 3)).values()
    with torch.no_grad():
        d0.normal_(std=0.1)
        d1.normal_(std=0.1)
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        fused = model(x)
    merge_in_place(model)
    assert not any(isinstance(m, bypass_layer._BypassMixin) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), fused)


# ---------------------------------------------------------------- tiny Hugging Face models


def _llama(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    torch.manual_seed(10)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(11)
    return GPT2LMHeadModel(cfg).eval()


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(12)
    return BertForSequenceClassification(cfg).eval()


def _not_head(name: str, module: nn.Module) -> bool:
    return "lm_head" not in name and "classifier" not in name and "pooler" not in name


MODELS = {
    "llama": (_llama, ""),
    "gpt2": (_gpt2, ""),
    "bert": (_bert, "bert."),  # index names lack the task model's "bert." prefix
}


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_tiny_models_end_to_end(arch):
    build, strip = MODELS[arch]
    model = build()
    index = make_index(model, 3, _not_head, strip)
    assert index.indices and (not strip or not any(n.startswith(strip) for n in index.indices))
    ids = torch.randint(1, 64, (2, 7))
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits
    base_sd = {n: t.clone() for n, t in model.state_dict().items()}

    params = attach(model, index)
    assert set(params) == set(index.indices)
    named = trainable_parameters(model)
    assert named and all(n.endswith(".neuroada_delta") for n, _ in named)
    assert count_trainable(model) == index.trainable_parameters()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base_logits)

    opt = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.0)
    model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    opt.step()
    sd = model.state_dict()
    for n in base_sd:
        assert torch.equal(sd[n], base_sd[n]), f"{n} changed"
    assert all(p.abs().sum() > 0 for p in params.values())

    with torch.no_grad():
        fused = model(input_ids=ids).logits
        set_mode(model, "reference")
        ref = model(input_ids=ids).logits
        set_mode(model, "fused")
    assert not torch.equal(fused, base_logits)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)

    # round trip through a delta sidecar onto a fresh copy of the base
    side = make_delta_sidecar(model, index, task="t")
    fresh = build()
    attach(fresh, index, side)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, fused)
    detach(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base_logits)


def test_bert_dense_head_loaded_and_restored():
    model = _bert()
    index = make_index(model, 2, _not_head, "bert.")
    attach(model, index)
    head = {"classifier.weight": torch.randn_like(model.classifier.weight)}
    side = make_delta_sidecar(model, index, dense=head)
    detach(model)
    orig = model.classifier.weight.detach().clone()
    attach(model, index, side)
    assert torch.equal(model.classifier.weight, head["classifier.weight"])
    detach(model)
    assert torch.equal(model.classifier.weight, orig)


def test_bf16_llama_deltas_and_grads_fp32():
    model = _llama(torch.bfloat16)
    params = attach(model, make_index(model, 2, _not_head))
    ids = torch.randint(1, 64, (2, 6))
    model(input_ids=ids).logits.float().square().mean().backward()
    for p in params.values():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_same_grads(reentrant):
    model = _llama()
    params = attach(model, make_index(model, 3, _not_head))
    model.train()
    ids = torch.randint(1, 64, (2, 9))

    def grads():
        for p in params.values():
            p.grad = None
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in params.items()}

    plain = grads()
    enable = getattr(model, "activation_checkpointing_enable", None)
    kwargs = {"use_reentrant": reentrant}
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:  # older transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    assert model.model.layers[0].gradient_checkpointing
    ckpt = grads()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- errors


def test_error_index_tensor_not_in_model():
    model = _llama()
    index = make_index(model, 2, _not_head)
    name = "model.layers.0.self_attn.q_proj.weight"
    index.indices["model.layers.9.mlp.up_proj.weight"] = index.indices.pop(name)
    index.entries["model.layers.9.mlp.up_proj.weight"] = index.entries.pop(name)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ModelError, match=r"'model\.layers\.9\.mlp\.up_proj\.weight'"):
        attach(model, index)
    assert not any(isinstance(m, bypass_layer._BypassMixin) for m in model.modules())
    assert model.state_dict().keys() == before.keys()
    assert all(p.requires_grad for p in model.parameters())


def test_error_wrong_shape_names_tensor():
    model = _llama()
    index = make_index(model, 2, _not_head)
    name = "model.layers.1.mlp.down_proj.weight"
    e = index.entries[name]
    index.entries[name] = TensorEntry((e.shape[0], e.shape[1] + 1), e.layout, e.dtype, e.fingerprint)
    with pytest.raises(ModelError, match=r"'model\.layers\.1\.mlp\.down_proj\.weight'.*\[16, 40\].*\[16, 41\]"):
        attach(model, index)


def test_error_not_a_linear_and_wrong_layout():
    model = _gpt2()
    index = make_index(model, 2, _not_head)
    name = "transformer.h.0.attn.c_attn.weight"
    e = index.entries[name]
    index.entries[name] = TensorEntry(e.shape, "out_in", e.dtype, e.fingerprint)
    with pytest.raises(ModelError, match=r"'transformer\.h\.0\.attn\.c_attn\.weight'.*layout"):
        attach(model, index)

    index = make_index(model, 2, _not_head)
    w = model.transformer.wte.weight
    index.indices["transformer.wte.weight"] = select(w.detach(), 2)
    index.entries["transformer.wte.weight"] = TensorEntry(tuple(w.shape), "out_in", "F32", "0" * 64)
    with pytest.raises(ModelError, match=r"'transformer\.wte\.weight'.*not the weight of an nn\.Linear"):
        attach(model, index)


def test_error_linear_subclass_with_its_own_forward():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(Scaled(8, 6))
    with pytest.raises(ModelError, match=r"'0\.weight'.*not the weight of an nn\.Linear or Conv1D \(found Scaled"):
        attach(model, make_index(model, 2))


def test_error_delta_shape_mismatch_and_double_attach():
    model = nn.Sequential(nn.Linear(8, 6))
    index = make_index(model, 2)
    attach(model, index)
    with pytest.raises(ModelError, match="already"):
        attach(model, index)
    side = make_delta_sidecar(model, index)
    detach(model)
    side.deltas["0.weight"] = torch.zeros(6, 3)
    with pytest.raises(SidecarError, match=r"'0\.weight'.*\[6, 3\]"):
        attach(model, index, side)
    assert deltas(model) == {}
