"""The NeuroAda bypass on single layers: gradients against the naive formulation, restore, state dicts, refresh."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from neuroada_tools.kernels import sddmm as sddmm_mod
from neuroada_tools.train import bypass
from neuroada_tools.train.bypass import (
    attach,
    detach,
    merge_in_place,
    set_mode,
)
from neuroada_tools.train.bypass import layer as bypass_layer
from tests.bypasskit import make_index, rel_err


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
    monkeypatch.setattr(sddmm_mod, "SDDMM_BACKEND", backend)
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
    monkeypatch.setattr(sddmm_mod, "SDDMM_BACKEND", backend)
    monkeypatch.setattr(sddmm_mod, "_L3_FLOATS", 1000)
    monkeypatch.setattr(sddmm_mod, "_L2_FLOATS", 1000)
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
    base = model[0].weight.detach().clone()
    for mode in ("fused", "reference", "sparse"):
        set_mode(model, mode)
        x.grad = delta.grad = None
        y = model(x)
        y.square().sum().backward()
        out[mode] = (y.detach(), x.grad.clone(), delta.grad.clone())
        if mode == "sparse":  # the sharding-safe mode never writes the weight
            assert torch.equal(model[0].weight, base)
    for mode in ("reference", "sparse"):
        for a, b in zip(out["fused"], out[mode]):
            assert rel_err(a, b) <= 1e-5, mode


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
    if sddmm_mod.native.kernel() is not None:  # the skip needs the compiled compare
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
