"""Token-id examples for causal LMs: prefix + prompt + output + eos, the prompt masked out of the loss
(chat records: the chat template's ids, the loss on the assistant turns; ``chat.py``)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from neuroada_tools.errors import DataError, ModelError
from neuroada_tools.train.data.chat import _special_prefix, chat_ids, check_chat_template, records_turns
from neuroada_tools.train.data.prompts import _check_max_length

if TYPE_CHECKING:  # pragma: no cover - typing only; importing transformers is slow
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""Label value that Hugging Face losses skip (prompt tokens, padding)."""


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildStats:
    """What a builder did.

    ``truncated``: examples cut to ``max_length``. ``no_target``: causal-LM examples whose labels
    are all ``-100`` (the response and its eos were cut away entirely); always 0 for
    classification and multiple choice. ``longest``: the longest example before truncation, in
    tokens (for multiple choice, the longest single (question, option) pair).
    """

    examples: int
    truncated: int
    no_target: int
    longest: int
    max_length: int

    def describe(self) -> str:
        """One line for a log, e.g. ``9427 examples, 3 truncated to 256 tokens (longest 301)``."""
        text = (
            f"{self.examples} examples, {self.truncated} truncated to {self.max_length} tokens "
            f"(longest {self.longest})"
        )
        if self.no_target:
            text += f", {self.no_target} with no target tokens left"
        return text


class Examples(list):  # type: ignore[type-arg]
    """The examples a builder made (a list of dicts), with :class:`BuildStats` in ``stats``."""

    def __init__(self, items: Iterable[dict[str, Any]], stats: BuildStats) -> None:
        super().__init__(items)
        self.stats = stats


# --------------------------------------------------------------------------------------------
# Tokenizer helpers
# --------------------------------------------------------------------------------------------


def _encode_plain(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens and without truncation."""
    if not texts:
        return []
    enc = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)
    return [list(ids) for ids in enc["input_ids"]]


def _encode_truncated(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    pairs: list[str] | None,
    max_length: int,
) -> tuple[dict[str, list[list[int]]], int, int]:
    """Encode (pairs of) texts with special tokens, cut to ``max_length``.

    Returns the encodings (``input_ids``, ``attention_mask`` and ``token_type_ids`` when the
    tokenizer makes them), the number of truncated ones and the longest length before truncation.
    Texts are encoded once in full; only the too-long ones are encoded again with truncation.
    """
    if not texts:
        return {"input_ids": [], "attention_mask": []}, 0, 0
    args: tuple[Any, ...] = (texts,) if pairs is None else (texts, pairs)
    full = tokenizer(*args, truncation=False, verbose=False)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in full]
    out = {k: [list(v) for v in full[k]] for k in keys}
    if "attention_mask" not in out:
        out["attention_mask"] = [[1] * len(ids) for ids in out["input_ids"]]
    lengths = [len(ids) for ids in out["input_ids"]]
    longest = max(lengths)
    long_ix = [i for i, n in enumerate(lengths) if n > max_length]
    if long_ix:
        cut_args: tuple[Any, ...] = ([texts[i] for i in long_ix],)
        if pairs is not None:
            cut_args += ([pairs[i] for i in long_ix],)
        cut = tokenizer(*cut_args, truncation=True, max_length=max_length, verbose=False)
        for j, i in enumerate(long_ix):
            for k in keys:
                out[k][i] = list(cut[k][j])
            if "attention_mask" not in cut:
                out["attention_mask"][i] = [1] * len(out["input_ids"][i])
    return out, len(long_ix), longest


# --------------------------------------------------------------------------------------------
# Causal LM
# --------------------------------------------------------------------------------------------


def build_causal_lm_examples(
    records: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    train_on_prompt: bool = False,
    fmt: str | None = None,
    template: str = "alpaca",
    path: str | os.PathLike[str] | None = None,
) -> Examples:
    """Causal-LM examples (``input_ids``, ``attention_mask``, ``labels``) from records.

    ``instruction`` records become ``prefix + prompt + output + eos`` with the prompt (and the
    tokenizer's prefix, e.g. bos) masked to ``-100`` in ``labels`` unless ``train_on_prompt``;
    under ``template="chat"`` they become a user and an assistant turn rendered with the
    tokenizer's chat template instead. ``text`` records become ``prefix + text + eos``, all
    trained. Standard ``prompt-completion`` records are rendered as instruction records with the
    prompt as it is; ``conversational`` records and prompt-completion records holding message
    lists are rendered with the chat template, the loss on every assistant turn (on the
    completion), see ``chat.py``. Examples are cut to ``max_length`` keeping the start; see
    :class:`BuildStats` (``result.stats``) for counts. A chat or prompt-completion record whose
    prompt fills ``max_length`` (no target token left) is a :class:`DataError` naming the file
    and line; Alpaca and text records are kept and counted in ``no_target``, as before. Every
    record is validated before anything is tokenized. ``path`` names the file in errors
    (default: the :class:`RecordList`'s own path).
    """
    max_length = _check_max_length(max_length)
    turns = records_turns(records, fmt=fmt, template=template, path=path)
    plain = [t for t in turns if not t.chat]
    if plain and tokenizer.eos_token_id is None:
        raise ModelError(
            "tokenizer has no eos token; causal-LM examples end with it (set eos_token)"
        )
    chats = [t for t in turns if t.chat]
    if chats:
        check_chat_template(tokenizer, chats[0].where)
    eos = tokenizer.eos_token_id
    prefix = _special_prefix(tokenizer) if plain else []
    prompt_ids = iter(_encode_plain(tokenizer, [t.prompt for t in plain]))
    response_ids = iter(_encode_plain(tokenizer, [t.response for t in plain]))

    examples: list[dict[str, Any]] = []
    truncated = no_target = longest = 0
    for t in turns:
        if t.chat:
            ids, spans = chat_ids(tokenizer, t)
        else:
            p_ids, r_ids = next(prompt_ids), next(response_ids)
            ids = prefix + p_ids + r_ids + [eos]
            spans = [(len(prefix) + len(p_ids) if t.masked else 0, len(ids))]
        if train_on_prompt:
            labels = list(ids)
        else:
            labels = [IGNORE_INDEX] * len(ids)
            for start, end in spans:
                labels[start:end] = ids[start:end]
        longest = max(longest, len(ids))
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if t.strict and all(label == IGNORE_INDEX for label in labels[1:]):  # the first is never predicted
                first = min((s for s, e in spans if e > s), default=len(ids))
                raise DataError(
                    f"{t.where}: the prompt fills --max-length {max_length} ({first} tokens before the first "
                    "target token), leaving no target token"
                )
        if all(label == IGNORE_INDEX for label in labels):
            no_target += 1
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    stats = BuildStats(len(examples), truncated, no_target, longest, max_length)
    return Examples(examples, stats)
