"""The three scorings of ``evaluate``: greedy generation, option log-likelihood, a classifier's argmax.

Tokens are those train-sparse trains on: a prompt is ``prefix + ids(prompt)`` (the tokenizer's own
leading special tokens, then the prompt without special tokens: ``train.data.examples``) and an
option, like a training output, is tokenized on its own (``prompt_style="template"``).

**Generation** decodes greedily, batch by batch with left padding, through ``generate``'s decoding
loop (any form: torch with a KV cache, ONNX with or without past), and extracts the answer with the
rule of ``answers.py``.

**Log-likelihood** scores each option of a multiple-choice item by ``sum_i log p(c_i | context,
c_<i)`` over the option's tokens ``c`` (one forward over ``context + option``, right-padded, the
log-softmax read at the positions that predict each option token). ``acc`` takes the option with the
largest sum; ``acc_norm`` the largest ``sum / len(option text in UTF-8 bytes)``, lm-eval-harness's
length normalisation (it divides by ``len()`` of the choice string, characters; the same for ASCII).
``prompt_style="lm-eval"`` renders lm-eval's arc_easy instead: context ``"Question: {q}\\nAnswer:"``,
continuation ``" {option}"``, no special tokens, the continuation's ids being those of the whole
text after the context's own (lm-eval's ``_encode_pair``).

Worked example (log-likelihood): options "oxygen" (2 tokens, log-probs -0.5 and -0.25) and "air"
(1 token, -1.0): sums -0.75 and -1.0, so ``acc`` picks "oxygen"; per byte -0.125 and -0.333, so
``acc_norm`` picks "oxygen" too.

**Classification**: the argmax of the head's logits against the label's id in the model's label names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from neuroada_tools.errors import DataError, ModelError
from neuroada_tools.evaluate.answers import extract, is_correct
from neuroada_tools.evaluate.records import Item
from neuroada_tools.train.data.examples import _encode_plain, _special_prefix

PROMPT_STYLES = ("template", "lm-eval")
Progress = Callable[[int], None] | None


def _check_vocab(ids: list[int], tokenizer, vocab: int, where: str) -> list[int]:
    """Drop special tokens the embedding lacks (tiny test models); refuse any other id outside it."""
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = [i for i in ids if i < vocab or i not in specials]
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise ModelError(f"{where}: token id {bad} lies outside the model's {vocab}-token embedding; "
                         "is the tokenizer of another model?")
    return ids


def prompt_ids(items: Sequence[Item], tokenizer, vocab: int) -> list[list[int]]:
    """``prefix + ids(prompt)`` of every item, as train-sparse builds its prompts (an item's own
    ``prompt_ids`` where the chat template rendered them)."""
    prefix = _special_prefix(tokenizer)
    plain = _encode_plain(tokenizer, [it.prompt for it in items if it.prompt_ids is None])
    out = []
    for it in items:
        ids = list(it.prompt_ids) if it.prompt_ids is not None else prefix + plain.pop(0)
        out.append(_check_vocab(ids, tokenizer, vocab, it.where))
    return out


def option_pairs(item: Item, tokenizer, style: str, vocab: int) -> list[tuple[list[int], list[int]]]:
    """``(context ids, continuation ids)`` of every option of ``item`` in ``style`` (module docstring)."""
    if item.options is None:
        raise DataError(f"{item.where}: no options to score by log-likelihood (a multiple-choice record "
                        "has 'options', or 'Answer1: ...' in its instruction)")
    if style == "template":
        context = (list(item.prompt_ids) if item.prompt_ids is not None
                   else _special_prefix(tokenizer) + _encode_plain(tokenizer, [item.prompt])[0])
        pairs = [(context, ids) for ids in _encode_plain(tokenizer, item.options)]
    elif style == "lm-eval":
        context_text = f"Question: {item.question}\nAnswer:"
        context = _encode_plain(tokenizer, [context_text])[0]
        wholes = _encode_plain(tokenizer, [f"{context_text} {o}" for o in item.options])
        pairs = [(context, whole[len(context):]) for whole in wholes]
    else:
        raise DataError(f"prompt style {style!r}: expected one of {', '.join(PROMPT_STYLES)}")
    out = []
    for k, (ctx, cont) in enumerate(pairs, start=1):
        if not ctx or not cont:
            raise DataError(f"{item.where}: option {k} gives no {'context' if not ctx else 'continuation'} tokens")
        out.append((_check_vocab(ctx, tokenizer, vocab, item.where), _check_vocab(cont, tokenizer, vocab, item.where)))
    return out


def check_positions(lengths: Sequence[tuple[str, int]], limit: int | None, extra: int = 0) -> None:
    """Refuse a sequence (``(where, tokens)``) longer than the model's positions, before scoring."""
    if limit is None:
        return
    for where, n in lengths:
        if n + extra > limit:
            raise ModelError(f"{where}: {n} tokens{f' + {extra} new tokens' if extra else ''} exceed the model's "
                             f"{limit} positions")


def loglik_scores(logits_of: Callable[[dict], torch.Tensor], pairs: Sequence[tuple[list[int], list[int]]], *,
                  pad_id: int, batch_size: int, progress: Progress = None) -> list[float]:
    """``sum log p(continuation | context)`` of every pair, batched longest first, right-padded."""
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    scores = [0.0] * len(pairs)
    for first in range(0, len(order), batch_size):
        chunk = order[first : first + batch_size]
        seqs = [pairs[i][0] + pairs[i][1] for i in chunk]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.tensor(s)
            mask[b, : len(s)] = 1
        logits = logits_of({"input_ids": ids, "attention_mask": mask})
        for b, i in enumerate(chunk):
            ctx, cont = pairs[i]
            rows = logits[b, len(ctx) - 1 : len(ctx) - 1 + len(cont)].double().log_softmax(dim=-1)
            scores[i] = float(rows.gather(1, torch.tensor(cont).view(-1, 1)).sum())
        if progress is not None:
            progress(len(chunk))
    return scores


def loglik_scores_shared(model: torch.nn.Module, pairs: Sequence[tuple[list[int], list[int]]], *, pad_id: int,
                         progress: Progress = None) -> list[float]:
    """The sums of :func:`loglik_scores`, computed with one forward per context instead of one per option.

    Consecutive pairs with the same context (the options of one item) form a group: the context runs once
    with a KV cache, its last logits give each continuation's first token, and the continuations (all but
    their last token, right-padded) run together on top of the cache, repeated per option, at positions
    ``len(context) + t``. For ARC-Easy in lm-eval's form (contexts of ~30 tokens, 4 options of ~5) that
    is ~2.8x fewer tokens (2.5x faster measured on SmolLM2). A torch causal LM that takes a KV cache and
    ``position_ids`` (every transformers decoder); the sums equal the unshared ones up to float rounding
    (4e-5 at most over 160 SmolLM2 options).
    """
    from neuroada_tools.hf.signature import cache_kwarg, output_cache

    device = next(model.parameters()).device
    cache_name = cache_kwarg(model)
    scores = [0.0] * len(pairs)
    start = 0
    while start < len(pairs):
        ctx = pairs[start][0]
        end = start + 1
        while end < len(pairs) and pairs[end][0] == ctx:
            end += 1
        conts = [pairs[i][1] for i in range(start, end)]
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ctx], device=device), use_cache=True)
            first = out.logits[0, -1].double().log_softmax(dim=-1).cpu()
            sums = [float(first[c[0]]) for c in conts]
            width = max(map(len, conts)) - 1
            if width > 0:
                n = len(conts)
                ids = torch.full((n, width), pad_id, dtype=torch.long)
                mask = torch.zeros((n, len(ctx) + width), dtype=torch.long)
                mask[:, : len(ctx)] = 1
                for b, c in enumerate(conts):
                    ids[b, : len(c) - 1] = torch.tensor(c[:-1])
                    mask[b, len(ctx) : len(ctx) + len(c) - 1] = 1
                past = output_cache(out)
                past.batch_repeat_interleave(n)
                positions = torch.arange(len(ctx), len(ctx) + width).expand(n, -1)
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                               position_ids=positions.to(device), use_cache=True, **{cache_name: past}).logits
                for b, c in enumerate(conts):
                    rows = logits[b, : len(c) - 1].double().log_softmax(dim=-1).cpu()
                    sums[b] += float(rows.gather(1, torch.tensor(c[1:]).view(-1, 1)).sum())
        scores[start:end] = sums
        if progress is not None:
            progress(end - start)
        start = end
    return scores


def pick(scores: Sequence[float], options: Sequence[str]) -> tuple[int, int, list[float]]:
    """``(acc choice, acc_norm choice, per-byte scores)``: the first largest sum and sum per UTF-8 byte."""
    norm = [s / max(1, len(o.encode("utf-8"))) for s, o in zip(scores, options)]
    best = max(range(len(scores)), key=lambda k: (scores[k], -k))
    return best, max(range(len(norm)), key=lambda k: (norm[k], -k)), norm


def generation_rows(items: Sequence[Item], texts: Sequence[str], rule: str) -> list[dict]:
    """One prediction row per generated text: the extracted answer and whether it is right."""
    rows = []
    for it, text in zip(items, texts):
        answer = extract(rule, text)
        rows.append({"where": it.where, "prompt": it.prompt, "generated": text, "extracted": answer,
                     "reference": it.reference, "parsed": answer is not None,
                     "correct": is_correct(rule, answer, it.reference)})
    return rows
