"""How a transformers model takes its inputs and returns its KV cache: the calling conventions
the ONNX exporter mirrors in its graphs and the parity check replays in torch (one owner, so the two
cannot drift apart)."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from neuroada_tools.errors import ModelError


def forward_params(model: nn.Module) -> set[str]:
    """Names of the keyword arguments ``model.forward`` accepts."""
    return set(inspect.signature(model.forward).parameters)


def cache_kwarg(model: nn.Module) -> str:
    """The forward keyword that takes the KV cache: ``cache`` (transformers >= 5) or ``past_key_values``."""
    params = forward_params(model)
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise ModelError(f"{type(model).__name__}: forward takes no KV cache; cannot export with past")


def output_cache(outputs):
    """The cache object of a model output (``.cache`` in transformers >= 5, ``.past_key_values`` before)."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else getattr(outputs, "past_key_values", None)


def uses_token_type_ids(model: nn.Module) -> bool:
    """BERT-like models get a ``token_type_ids`` input (GPT-2's forward takes one too, but has no
    segment vocabulary; optimum leaves it out there, and so do we)."""
    config = model.config
    return "token_type_ids" in forward_params(model) and getattr(config, "type_vocab_size", 0) >= 2


def past_names(num_layers: int) -> tuple[list[str], list[str]]:
    """``(past input names, present output names)`` in optimum's order: layer-major, key before value."""
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return past, present


def position_ids_from_mask(attention_mask: torch.Tensor, query_length: int) -> torch.Tensor:
    """Position ids of the last ``query_length`` tokens, counted over attended tokens only.

    Example: mask ``[[1, 1, 1, 0, 0, 1]]`` (3 real tokens, 2 pads, one new token), query_length 1
    -> ``[[3]]``: the new token continues the real sequence. Padded slots get 1, as in transformers.
    """
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 1)
    return positions[:, -query_length:]


def flat_cache(cache, num_layers: int) -> list[torch.Tensor]:
    """``[k0, v0, k1, v1, ...]`` from a ``DynamicCache``; refuses anything but plain full-attention layers."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if not isinstance(cache, DynamicCache):
        raise ModelError(
            f"with-past export supports only a transformers DynamicCache; this model returns {type(cache).__name__}"
        )
    layers = list(cache.layers)
    odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if odd:
        raise ModelError(
            "with-past export supports only full-attention cache layers (DynamicLayer); this model uses "
                f"{', '.join(odd)}"
        )
    if len(layers) != num_layers:
        raise ModelError(f"with-past export: cache has {len(layers)} layers, config says {num_layers}")
    flat: list[torch.Tensor] = []
    for layer in layers:
        flat += [layer.keys, layer.values]
    return flat


def num_hidden_layers(config) -> int:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    if not isinstance(n, int) or n <= 0:
        raise ModelError(f"config has no usable num_hidden_layers (found {n!r})")
    return n


def input_vocab_size(model: nn.Module) -> int:
    """How many token ids ``model`` can look up: the row count of its input embedding, else the
    (text) config's ``vocab_size``. Example: GPT-2 with ``vocab_size=96`` -> 96, whatever ids its
    config gives bos/eos/pad (tiny test models often hold 50256 there)."""
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    rows = getattr(emb, "num_embeddings", None)
    if isinstance(rows, int) and rows > 0:
        return rows
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.vocab_size)


def first_id_within(candidates: list, vocab: int) -> int | None:
    """The first candidate token id in ``[0, vocab)``; a candidate may be None, an int, or a list of
    ints (several ``eos_token_id``). None when no candidate lies in the vocabulary.

    Example: ``first_id_within([50257, [50256, 3]], 96)`` -> 3; ``first_id_within([None], 96)`` -> None.
    """
    for c in candidates:
        for i in c if isinstance(c, (list, tuple)) else [c]:
            if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab:
                return i
    return None
