"""The decoding loop: choose a token per sequence from the last logits, stop at EOS per sequence.

A *session* (``sessions.py``) has two methods: ``first(prompts)`` takes the prompts (lists of token
ids, of any lengths) and returns the logits of each prompt's next token, ``[batch, V]``; ``next(tokens)``
appends one token to every sequence and returns the logits after it. How a session pads and caches is
its own business: every session returns for each row exactly what the model gives that row alone,
up to float rounding, so a batch decodes like its prompts one by one (greedy, fp32).

Choosing (``choose_tokens``): only ids ``< vocab`` are candidates, ``vocab`` being the ids the input
embedding holds (an LM head may be wider; a token the embedding lacks could not be fed back).
Greedy takes the first largest logit. Sampling divides by ``temperature``, keeps the ``top_k`` largest
(0: all), and draws from the softmax with one generator per prompt, seeded from ``(seed, prompt
number)``: a prompt's sampled text does not depend on the batch it came in (beyond float rounding).

Worked example (greedy, vocab 3, EOS 2, max_new_tokens 3): logits ``[[0, 5, 1]]`` -> token 1;
``[[9, 0, 0]]`` -> token 0; ``[[0, 0, 7]]`` -> token 2 = EOS: stop ``"eos"``, token ids ``[1, 0, 2]``.
A finished row keeps being fed (its own last token) while others go on; its outputs are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from neuroada_tools.errors import ModelError


class Session(Protocol):
    def first(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor: ...

    def next(self, tokens: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Sampling:
    """``temperature == 0``: greedy. Otherwise sample from ``softmax(logits / temperature)`` over the
    ``top_k`` largest logits (0: all), with generators seeded from ``seed``."""

    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise ModelError(f"temperature {self.temperature}: expected 0 (greedy) or a finite positive number")
        if self.top_k < 0:
            raise ModelError(f"top-k {self.top_k}: expected 0 (all) or a positive count")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        if self.greedy:
            return {"mode": "greedy"}
        return {"mode": "sample", "temperature": self.temperature, "top_k": self.top_k, "seed": self.seed}


@dataclass
class Generated:
    """One prompt's result: its ids, the new token ids (EOS included when it ended there), and why
    it stopped: ``"eos"`` or ``"length"`` (``max_new_tokens`` reached)."""

    prompt_ids: list[int]
    token_ids: list[int]
    stop: str


def row_generator(seed: int, prompt_number: int) -> torch.Generator:
    """The sampling generator of one prompt: the same for a prompt whatever batch it is in."""
    return torch.Generator().manual_seed((seed * 1_000_003 + prompt_number) % (2**63))


def choose_tokens(logits: torch.Tensor, vocab: int, sampling: Sampling,
                  generators: Sequence[torch.Generator] = ()) -> torch.Tensor:
    """Next token per row from ``logits`` ``[batch, V]``, among ids ``< vocab``; int64 ``[batch]``.

    Example: ``choose_tokens(torch.tensor([[0., 3., 9.]]), 2, Sampling())`` -> ``tensor([1])``
    (id 2 lies outside a 2-row embedding, so it is never chosen).
    """
    scores = logits[:, : min(vocab, logits.shape[-1])].float()
    if sampling.greedy:
        # numpy's argmax (the first largest, as torch's): torch's worker threads would keep spinning after
        # it and slow ONNX Runtime's next step by ~30% on 2 cores
        return torch.from_numpy(scores.detach().cpu().numpy().argmax(axis=-1)).long()
    scores = scores.double() / sampling.temperature
    if 0 < sampling.top_k < scores.shape[-1]:
        kth = scores.topk(sampling.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.cat([torch.multinomial(probs[b], 1, generator=generators[b]) for b in range(probs.shape[0])])


def generate_ids(
    session: Session,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos_ids: Sequence[int],
    vocab: int,
    sampling: Sampling = Sampling(),
    first_number: int = 0,
) -> list[Generated]:
    """Decode up to ``max_new_tokens`` for every prompt; a row stops at its first EOS.

    ``first_number`` numbers the prompts (for the sampling generators) when a long list is decoded
    in several batches.
    """
    if not prompts:
        return []
    if max_new_tokens < 1:
        raise ModelError(f"max new tokens {max_new_tokens}: expected at least 1")
    empty = next((n for n, p in enumerate(prompts, start=first_number + 1) if len(p) == 0), None)
    if empty is not None:
        raise ModelError(f"prompt {empty}: no tokens (an empty prompt)")
    eos = {int(i) for i in eos_ids}
    generators = [] if sampling.greedy else [row_generator(sampling.seed, first_number + b)
                                             for b in range(len(prompts))]
    out: list[list[int]] = [[] for _ in prompts]
    stop = ["length"] * len(prompts)
    with torch.no_grad():
        logits = session.first(prompts)
        for step in range(max_new_tokens):
            tokens = choose_tokens(logits, vocab, sampling, generators)
            for b, t in enumerate(tokens.tolist()):
                if stop[b] == "length":
                    out[b].append(t)
                    if t in eos:
                        stop[b] = "eos"
            if all(s == "eos" for s in stop) or step == max_new_tokens - 1:
                break
            logits = session.next(tokens)
    return [Generated(list(map(int, p)), ids, s) for p, ids, s in zip(prompts, out, stop)]


def pad_left(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with the prompts flush right (decoders continue at the right end).

    Example: ``[[5, 6, 7], [8]]``, pad 0 -> ids ``[[5, 6, 7], [0, 0, 8]]``, mask ``[[1, 1, 1], [0, 0, 1]]``.
    """
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        if len(p):
            ids[b, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[b, width - len(p):] = 1
    return ids, mask


def pad_right(prompts: Sequence[Sequence[int]], pad_id: int, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with the prompts flush left, ``extra`` more padded columns.

    Example: ``[[5, 6, 7], [8]]``, pad 0 -> ids ``[[5, 6, 7], [8, 0, 0]]``, mask ``[[1, 1, 1], [1, 0, 0]]``.
    """
    width = max(len(p) for p in prompts) + extra
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        if len(p):
            ids[b, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
            mask[b, : len(p)] = 1
    return ids, mask
