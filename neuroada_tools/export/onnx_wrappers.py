"""The modules the ONNX exporter traces (logits only, or one cached decoding step on flat
tensors) and the example inputs it traces them with."""

from __future__ import annotations

import torch
from torch import nn

from neuroada_tools.errors import ModelError
from neuroada_tools.hf.signature import (
    cache_kwarg,
    first_id_within,
    flat_cache,
    forward_params,
    input_vocab_size,
    num_hidden_layers,
    output_cache,
    position_ids_from_mask,
    uses_token_type_ids,
)

EXPORT_BATCH = 2
EXPORT_SEQ = 8
EXPORT_PAST = 5
EXPORT_CHOICES = 3


class LogitsOnly(nn.Module):
    """``model(input_ids, attention_mask) -> logits`` (no cache, no loss, no hidden states)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._no_cache = {"use_cache": False} if "use_cache" in forward_params(model) else {}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **self._no_cache).logits


class LogitsOnlyWithTokenTypes(LogitsOnly):
    """As ``LogitsOnly``, for BERT-like models that also take ``token_type_ids``."""

    def forward(  # type: ignore[override]
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, **self._no_cache
        ).logits


class LogitsWithPast(nn.Module):
    """One cached decoding step on flat tensors: builds a ``DynamicCache`` from
    ``past = [k0, v0, k1, v1, ...]``, runs the model and returns ``(logits, *presents)``."""

    def __init__(self, model: nn.Module, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        self._cache_kw = cache_kwarg(model)
        self._positions = "position_ids" in forward_params(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: list[torch.Tensor]):
        from transformers import DynamicCache

        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        kwargs = {self._cache_kw: cache, "use_cache": True}
        if self._positions:
            kwargs["position_ids"] = position_ids_from_mask(attention_mask, input_ids.shape[1])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return (out.logits, *flat_cache(output_cache(out), self.num_layers))


def example_inputs(model: nn.Module, batch: int, seq: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids with the last row right-padded (sizes >= 2 so no axis is specialised to 0/1).

    Every id is one the input embedding holds: a config ``pad_token_id`` outside it is replaced by 0.
    """
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    vocab = input_vocab_size(model)
    pad = first_id_within([getattr(config, "pad_token_id", None)], vocab)
    pad = 0 if pad is None else pad
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    if vocab > 1:
        ids = torch.where(ids == pad, (ids + 1) % vocab, ids)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq // 2 :] = 0
    ids = ids.masked_fill(mask == 0, pad)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if uses_token_type_ids(model):
        tt = torch.zeros(batch, seq, dtype=torch.long)
        tt[:, seq // 2 :] = 1
        inputs["token_type_ids"] = tt * mask
    return inputs


def with_past_args(model: nn.Module) -> tuple:
    """Example ``(input_ids, attention_mask, past)`` for the with-past export, from a real prefill.

    Runs before anything is exported, so a model whose cache the graph cannot mirror (sliding
    window, linear attention, encoder-decoder) fails fast with a ``ModelError``.
    """
    arch = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        raise ModelError(f"{arch}: with-past export of encoder-decoder models is not supported")
    n_layers = num_hidden_layers(model.config)
    cache_kwarg(model)  # refuses a model whose forward takes no cache
    prefill = example_inputs(model, EXPORT_BATCH, EXPORT_PAST, seed=1)
    prefill["attention_mask"][-1, -1] = 1  # pad in the middle of the past as well as at its end
    with torch.no_grad():
        out = model(**prefill, use_cache=True)
    try:
        past = [t.detach().clone() for t in flat_cache(output_cache(out), n_layers)]
    except ModelError as e:
        raise ModelError(f"{arch}: cannot export with past: {e}") from e
    step = example_inputs(model, EXPORT_BATCH, EXPORT_SEQ - EXPORT_PAST, seed=2)
    mask = torch.cat([prefill["attention_mask"], torch.ones_like(step["input_ids"])], dim=1)
    return step["input_ids"], mask, past
