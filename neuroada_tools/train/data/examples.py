"""Token-id examples for causal LMs: prefix + prompt + output + eos, the prompt masked out of the loss."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from neuroada_tools.errors import DataError, ModelError
from neuroada_tools.train.data.prompts import _check_max_length, _field_str, _resolve_format, format_prompt
from neuroada_tools.train.data.records import _json_type, _Locator

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


def _special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the tokenizer puts before a single text (``[bos]`` or ``[]``)."""
    probe = "a"
    with_special = list(tokenizer(probe, add_special_tokens=True, verbose=False)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False, verbose=False)["input_ids"])
    n = len(plain)
    for k in range(len(with_special) - n + 1):
        if with_special[k : k + n] == plain:
            return with_special[:k]
    return []


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
    path: str | os.PathLike[str] | None = None,
) -> Examples:
    """Causal-LM examples (``input_ids``, ``attention_mask``, ``labels``) from records.

    ``instruction`` records become ``prefix + prompt + output + eos`` with the prompt (and the
    tokenizer's prefix, e.g. bos) masked to ``-100`` in ``labels`` unless ``train_on_prompt``;
    ``text`` records become ``prefix + text + eos``, all trained. Examples are cut to
    ``max_length`` keeping the start; see :class:`BuildStats` (``result.stats``) for counts.
    Every record is validated before anything is tokenized. ``path`` names the file in errors
    (default: the :class:`RecordList`'s own path).
    """
    max_length = _check_max_length(max_length)
    loc = _Locator(records, path)
    if not records:
        raise DataError(f"{loc.file()}: no records")
    fmt = _resolve_format(records, fmt, path)
    if fmt == "classification":
        raise DataError(
            f"{loc.at(0)}: classification data has no response to train a causal LM on "
            "(use the instruction or text format, or a classification model)"
        )

    prompts: list[str] = []
    responses: list[str] = []
    for i, record in enumerate(records):
        where = loc.at(i)
        if not isinstance(record, Mapping):
            raise DataError(f"{where}: expected a JSON object, found {_json_type(record)}")
        if fmt == "instruction":
            instruction = _field_str(record, "instruction", where, fmt=fmt, nonempty=True)
            extra = _field_str(record, "input", where, fmt=fmt, required=False)
            responses.append(_field_str(record, "output", where, fmt=fmt))
            prompts.append(format_prompt(instruction, extra))
        else:
            responses.append(_field_str(record, "text", where, fmt=fmt, nonempty=True))
            prompts.append("")

    eos = tokenizer.eos_token_id
    if eos is None:
        raise ModelError(
            "tokenizer has no eos token; causal-LM examples end with it (set eos_token)"
        )
    prefix = _special_prefix(tokenizer)
    prompt_ids = _encode_plain(tokenizer, prompts)
    response_ids = _encode_plain(tokenizer, responses)

    examples: list[dict[str, Any]] = []
    truncated = no_target = longest = 0
    for p_ids, r_ids in zip(prompt_ids, response_ids, strict=True):
        ids = prefix + p_ids + r_ids + [eos]
        labels = list(ids)
        if fmt == "instruction" and not train_on_prompt:
            n_prompt = len(prefix) + len(p_ids)
            labels[:n_prompt] = [IGNORE_INDEX] * n_prompt
        longest = max(longest, len(ids))
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            no_target += 1
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    stats = BuildStats(len(examples), truncated, no_target, longest, max_length)
    return Examples(examples, stats)
