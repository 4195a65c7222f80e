"""Sessions for ``decode.generate_ids``: prompts -> next-token logits, then one token per step.

``TorchCached``: a transformers causal LM with its KV cache. The prompts are left-padded (a decoder
continues at the right end of every row), the attention mask covers pads and cache alike, and the
position ids are counted over attended tokens only (``hf.signature.position_ids_from_mask``), so a
padded row sees the positions it would see alone.

``OnnxWithPast``: the exported ``model_with_past.onnx`` (``merge --to onnx --with-past``) on ONNX
Runtime: a prefill from a zero-length past, then one token per step fed with the graph's own
``present.N.key/value`` outputs as ``past_key_values.N.key/value``. Same padding as ``TorchCached``;
the graph derives position ids from the mask itself, exactly as ``TorchCached`` passes them.

``FullRerun``: no cache; every step runs the whole sequence through a logits-only model
(``model.onnx``, whose position ids are the defaults ``0..T-1``). The sequences are kept flush left
(right padding, each new token written after its row's last real one), so the defaults are the right
positions; the logits read are those at each row's last real token.

What this leaves out: beam search, caches other than a plain KV cache for ONNX (the exporter refuses
them), and speculative tricks. Every session runs in eval mode without gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from neuroada_tools.forms.onnx_runtime import empty_past, ort_run
from neuroada_tools.generate.decode import pad_left, pad_right
from neuroada_tools.hf.signature import (
    cache_kwarg,
    forward_params,
    output_cache,
    past_names,
    position_ids_from_mask,
)


def _last(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, :].detach().float().cpu()


class TorchCached:
    """A transformers causal LM decoding with its own KV cache (left padding, mask-derived positions)."""

    def __init__(self, model: nn.Module, pad_id: int):
        self.model = model.eval()
        self.pad_id = pad_id
        self.cache_kw = cache_kwarg(model)
        self.positions = "position_ids" in forward_params(model)
        self.device = next(model.parameters()).device
        self.mask: torch.Tensor | None = None
        self.cache = None

    def _forward(self, ids: torch.Tensor, cache) -> torch.Tensor:
        kw = {self.cache_kw: cache} if cache is not None else {}
        if self.positions:
            kw["position_ids"] = position_ids_from_mask(self.mask, ids.shape[1]).to(self.device)
        with torch.no_grad():
            out = self.model(input_ids=ids.to(self.device), attention_mask=self.mask.to(self.device),
                             use_cache=True, **kw)
        self.cache = output_cache(out)
        return _last(out.logits)

    def first(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        ids, self.mask = pad_left(prompts, self.pad_id)
        return self._forward(ids, None)

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, torch.ones(len(tokens), 1, dtype=self.mask.dtype)], dim=1)
        return self._forward(tokens.view(-1, 1), self.cache)


class OnnxWithPast:
    """``model_with_past.onnx`` on ONNX Runtime: prefill from an empty past, then its presents fed back.

    ``session`` comes from ``with_past_session`` (one per graph, shared by every batch)."""

    def __init__(self, session, where: str, num_layers: int, pad_id: int):
        self.session, self.where = session, where
        self.past_in, self.present_out = past_names(num_layers)
        self.pad_id = pad_id
        self.mask: torch.Tensor | None = None
        self.past: dict[str, torch.Tensor] = {}

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = ort_run(self.session, {"input_ids": ids, "attention_mask": self.mask, **self.past}, self.where)
        self.past = {p: out[q] for p, q in zip(self.past_in, self.present_out)}
        return _last(out["logits"])

    def first(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        ids, self.mask = pad_left(prompts, self.pad_id)
        self.past = empty_past(self.session, self.past_in, ids.shape[0], self.where)
        return self._forward(ids)

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, torch.ones(len(tokens), 1, dtype=self.mask.dtype)], dim=1)
        return self._forward(tokens.view(-1, 1))


class FullRerun:
    """No cache: the whole (right-padded) sequence through ``logits_of(ids, mask) -> [B, T, V]`` every step."""

    def __init__(self, logits_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], pad_id: int):
        self.logits_of = logits_of
        self.pad_id = pad_id
        self.ids: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.lengths: torch.Tensor | None = None

    def _forward(self) -> torch.Tensor:
        width = int(self.lengths.max())
        logits = self.logits_of(self.ids[:, :width], self.mask[:, :width])
        return logits[torch.arange(len(self.lengths)), self.lengths - 1].detach().float().cpu()

    def first(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        self.ids, self.mask = pad_right(prompts, self.pad_id)
        self.lengths = self.mask.sum(dim=1)
        return self._forward()

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        if int(self.lengths.max()) == self.ids.shape[1]:  # one more column for the longest row
            self.ids = torch.cat([self.ids, torch.full_like(self.ids[:, :1], self.pad_id)], dim=1)
            self.mask = torch.cat([self.mask, torch.zeros_like(self.mask[:, :1])], dim=1)
        rows = torch.arange(len(tokens))
        self.ids[rows, self.lengths] = tokens.to(self.ids.dtype)
        self.mask[rows, self.lengths] = 1
        self.lengths = self.lengths + 1
        return self._forward()
