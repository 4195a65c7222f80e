"""The NeuroAda bypass on tiny Hugging Face models (Llama, GPT-2, BERT) and its errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuroada_tools.errors import ModelError, SidecarError
from neuroada_tools.index.criteria import select
from neuroada_tools.io.sidecar import TensorEntry
from neuroada_tools.train.bypass import (
    attach,
    count_trainable,
    deltas,
    detach,
    make_delta_sidecar,
    set_mode,
    trainable_parameters,
)
from neuroada_tools.train.bypass import layer as bypass_layer
from tests.bypasskit import make_index

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
