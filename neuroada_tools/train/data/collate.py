"""Right-pad a list of examples into tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from neuroada_tools.train.data.examples import IGNORE_INDEX

if TYPE_CHECKING:  # pragma: no cover - typing only; importing transformers is slow
    pass




# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def _pad(rows: Sequence[Sequence[int]], length: int, value: int) -> list[list[int]]:
    return [list(r) + [value] * (length - len(r)) for r in rows]


def _round_up(n: int, multiple: int | None) -> int:
    if multiple is None or multiple <= 1:
        return n
    return -(-n // multiple) * multiple


def _example_kind(example: Mapping[str, Any]) -> str:
    ids = example["input_ids"]
    if ids and isinstance(ids[0], (list, tuple)):
        return "multiple choice"
    if "labels" in example:
        return "causal LM"
    if "label" in example:
        return "classification"
    return "unlabelled"


def collate(
    examples: Sequence[Mapping[str, Any]],
    pad_token_id: int,
    *,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad a list of builder examples into ``torch.long`` tensors (``choice_mask``: bool).

    - causal LM (examples with ``labels``): ``input_ids``/``attention_mask``/``labels``
      ``[batch, seq]``, padded with ``pad_token_id`` / 0 / ``-100``;
    - classification (examples with ``label``): ``input_ids``, ``attention_mask``,
      (``token_type_ids``) ``[batch, seq]`` and ``labels`` ``[batch]``;
    - multiple choice (``input_ids`` a list of lists): ``[batch, num_choices, seq]`` tensors with
      ``num_choices`` the largest in the batch, ``labels`` ``[batch]`` and ``choice_mask``
      ``[batch, num_choices]`` (False for a padded choice). A padded choice repeats the
      example's first option, so no row is all padding (an all-masked attention row can give
      NaN); the training loop must set the logits where ``choice_mask`` is False to ``-inf``
      and must not pass ``choice_mask`` to the model.

    Examples with neither ``labels`` nor ``label`` give a batch without ``labels``.
    ``token_type_ids`` is padded with 0. ``seq`` is rounded up to ``pad_to_multiple_of``.
    Misuse (no examples, mixed kinds, a non-int ``pad_token_id``) is a ``ValueError``: it is a
    programming error, not bad data.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
        raise ValueError(f"pad_token_id must be an int, got {pad_token_id!r}")
    kind = _example_kind(examples[0])
    for ex in examples:
        ex_kind = _example_kind(ex)
        if ex_kind != kind:
            raise ValueError(f"collate got a mix of example kinds ({kind} and {ex_kind})")
    has_tt = "token_type_ids" in examples[0]
    pad_values = {"input_ids": pad_token_id, "attention_mask": 0, "token_type_ids": 0}

    if kind == "multiple choice":
        num_choices = max(len(ex["input_ids"]) for ex in examples)
        seq = _round_up(max(len(r) for ex in examples for r in ex["input_ids"]), pad_to_multiple_of)
        keys = ["input_ids", "attention_mask"] + (["token_type_ids"] if has_tt else [])
        batch: dict[str, list[Any]] = {k: [] for k in keys}
        choice_mask = []
        for ex in examples:
            n = len(ex["input_ids"])
            if n == 0:
                raise ValueError("a multiple-choice example has no options")
            choice_mask.append([True] * n + [False] * (num_choices - n))
            for k in keys:
                rows = list(ex[k]) + [ex[k][0]] * (num_choices - n)
                batch[k].append(_pad(rows, seq, pad_values[k]))
        out = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        out["labels"] = torch.tensor([int(ex["label"]) for ex in examples], dtype=torch.long)
        out["choice_mask"] = torch.tensor(choice_mask, dtype=torch.bool)
        return out

    seq = _round_up(max(len(ex["input_ids"]) for ex in examples), pad_to_multiple_of)
    out = {
        "input_ids": torch.tensor(
            _pad([ex["input_ids"] for ex in examples], seq, pad_token_id), dtype=torch.long
        ),
        "attention_mask": torch.tensor(
            _pad([ex["attention_mask"] for ex in examples], seq, 0), dtype=torch.long
        ),
    }
    if has_tt:
        out["token_type_ids"] = torch.tensor(
            _pad([ex["token_type_ids"] for ex in examples], seq, 0), dtype=torch.long
        )
    if kind == "causal LM":
        out["labels"] = torch.tensor(
            _pad([ex["labels"] for ex in examples], seq, IGNORE_INDEX), dtype=torch.long
        )
    elif kind == "classification":
        out["labels"] = torch.tensor([int(ex["label"]) for ex in examples], dtype=torch.long)
    return out
