"""``run_evaluate``: a data file with references through one form of the model, scored, summarised.

Order of work, so that what can be refused is refused before a model is loaded: read the records
(``train.data.read_records``), turn them into items (``records.py``; a bad record is one line naming
its file and line), pick the answer rule and check every reference against it, load the tokenizer
and tokenize every prompt and option, refuse a sequence longer than the model's positions; only then
open the form (``forms.open_form``, or ``generate.sources`` for decoding) and score.

The summary holds the accuracy (log-likelihood: ``acc`` and ``acc_norm``) with its 95% Wilson
interval (``answers.wilson``), the number of generations the rule could not parse, and the seconds
spent scoring (model loading excluded). ``predictions`` writes one JSON line per example, atomically.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from neuroada_tools.errors import DataError, ModelError
from neuroada_tools.evaluate import answers, scoring
from neuroada_tools.evaluate.records import to_items
from neuroada_tools.forms import open_form
from neuroada_tools.generate import sources
from neuroada_tools.generate.decode import generate_ids
from neuroada_tools.generate.genai import genai_logits, is_genai_folder
from neuroada_tools.generate.genai import load_model as genai_load
from neuroada_tools.generate.prompts import completion_text, load_prompt_tokenizer
from neuroada_tools.hf import task_config
from neuroada_tools.io.outputs import atomic_file
from neuroada_tools.train.data import read_records
from neuroada_tools.train.data.examples import _encode_truncated

SCORINGS = ("generate", "loglik")


@dataclass
class EvalSettings:
    data: Path
    scoring: str = "generate"
    template: str = "alpaca"
    prompt_style: str = "template"
    rule: str | None = None
    skip: int = 0
    limit: int | None = None
    max_new_tokens: int = 32
    batch_size: int = 8
    device: str | None = None
    with_past: bool = False
    provider: str = "cpu"
    tokenizer: Path | None = None
    predictions: Path | None = None


@dataclass
class ModelArgs:
    model: Path | None = None
    index: Path | None = None
    delta: Path | None = None
    merged: Path | None = None
    onnx: Path | None = None

    @property
    def folder(self) -> Path:
        return Path(self.model or self.merged or self.onnx)


def _accuracy(correct: int, total: int) -> dict:
    lo, hi = answers.wilson(correct, total)
    return {"correct": correct, "accuracy": correct / total if total else 0.0, "interval95": [lo, hi]}


def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def run_evaluate(settings: EvalSettings, model: ModelArgs, *,
                 progress: Callable[[int, int], Callable[[int], None]] | None = None) -> tuple[dict, list[dict]]:
    """``(summary, prediction rows)``; ``progress(total, _)`` returns the callable advanced per example."""
    s = settings
    if s.scoring not in SCORINGS:
        raise DataError(f"scoring {s.scoring!r}: expected one of {', '.join(SCORINGS)}")
    records = read_records(s.data)
    records = records[s.skip : None if s.limit is None else s.skip + s.limit]
    if not records:
        raise DataError(f"{s.data}: no records left after skipping {s.skip}")
    tokenizer = functools.cache(lambda: load_prompt_tokenizer(s.tokenizer if s.tokenizer is not None else model.folder))
    items = to_items(records, s.template, path=s.data, tokenizer=tokenizer)
    classify = items[0].kind == "classification"
    rule = None
    if not classify and s.scoring == "generate":
        rule = s.rule or answers.detect_rule([it.reference for it in items])
        for it in items:
            answers.check_reference(rule, it.reference, it.where)
    if not classify and s.scoring == "loglik":
        missing = next((it for it in items if it.options is None), None)
        if missing is not None:
            raise DataError(f"{missing.where}: no options to score by log-likelihood (need 'options', "
                            "'Answer1: ...' in the instruction, or an 'Answer format: a/b' line)")

    folder = model.folder
    config = task_config(folder, "causal-lm")
    vocab = int(_text_config(config).vocab_size)
    limit = sources.max_positions(config)
    tok = tokenizer()
    if classify:
        summary, rows = _classify(items, tok, model, s, limit)
    elif s.scoring == "loglik":
        pairs = [scoring.option_pairs(it, tok, s.prompt_style, vocab) for it in items]
        scoring.check_positions([(it.where, len(c) + len(o)) for it, p in zip(items, pairs) for c, o in p], limit)
        form = (GenAIForm.open(model.onnx, s.provider) if model.onnx is not None and is_genai_folder(model.onnx)
                else open_form(**vars(model), device=s.device, provider=s.provider))
        _require_lm(form.task, folder, "log-likelihood")
        summary, rows = _loglik(items, pairs, form, tok, s, progress)
    else:
        ids = scoring.prompt_ids(items, tok, vocab)
        scoring.check_positions([(it.where, len(p)) for it, p in zip(items, ids)], limit, s.max_new_tokens)
        summary, rows = _generate(items, ids, tok, model, s, rule, progress)
    summary = {"data": str(s.data), "examples": len(items), "skip": s.skip, "limit": s.limit,
               "template": s.template, **summary}
    if s.predictions is not None:
        write_predictions(s.predictions, rows)
    return summary, rows


@dataclass
class GenAIForm:
    """An ORT GenAI folder (``merge --to onnx`` of a decoder LLM) as a form for log-likelihood: whole-sequence
    logits from its runtime, one prefill per row (``generate.genai.genai_logits``), the model loaded once."""

    folder: Path
    config: object
    provider: str
    og_model: object
    task: str = "causal-lm"
    model: None = None

    @classmethod
    def open(cls, folder: Path, provider: str) -> GenAIForm:
        return cls(Path(folder), task_config(Path(folder), "causal-lm"), provider, genai_load(Path(folder), provider))

    def logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return genai_logits(self.folder, inputs, self.provider, model=self.og_model)

    def describe(self) -> str:
        return f"onnx-genai: {self.folder} (onnxruntime-genai, {self.provider})"


def _require_lm(task: str, folder: Path, what: str) -> None:
    if task != "causal-lm":
        raise ModelError(f"{folder}: a {task} model; {what} scoring needs a causal LM")


def _bar(progress, total: int):
    return progress(total, 0) if progress is not None else None


def _loglik(items, pairs, form, tok, s: EvalSettings, progress) -> tuple[dict, list[dict]]:
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    summary, rows = loglik_accuracy(items, pairs, form.logits, pad_id=min(pad, form_vocab(form) - 1),
                                    batch_size=s.batch_size, progress=_bar(progress, sum(map(len, pairs))),
                                    model=_shareable(form))
    return {"scoring": "loglik", "prompt_style": s.prompt_style, "form": form.describe(), **summary}, rows


def _shareable(form) -> torch.nn.Module | None:
    """The torch causal LM of ``form`` when its options can share their context's KV cache, else None."""
    from neuroada_tools.hf.signature import cache_kwarg, forward_params

    model = getattr(form, "model", None)
    if model is None or "position_ids" not in forward_params(model):
        return None
    try:
        cache_kwarg(model)
    except ModelError:
        return None
    return model


def loglik_accuracy(items, pairs, logits_of: Callable[[dict], torch.Tensor] | None, *, pad_id: int,
                    batch_size: int, progress: Callable[[int], None] | None = None,
                    model: torch.nn.Module | None = None) -> tuple[dict, list[dict]]:
    """``(summary, rows)`` of log-likelihood scoring: ``pairs[i]`` holds ``scoring.option_pairs(items[i], ...)``
    and ``logits_of`` maps a right-padded batch (``input_ids``, ``attention_mask``) to its logits, so any model
    held in memory (an adapter being trained, a benchmark's) is scored exactly as ``evaluate`` scores a form.
    With ``model`` (a torch causal LM) the options of an item share one forward of their context
    (``scoring.loglik_scores_shared``); ``logits_of`` is then unused.
    The summary holds ``acc`` and ``acc_norm`` (sum log-prob per UTF-8 byte) with their 95% Wilson intervals,
    and ``gold_nll``: the mean over items of minus the right option's summed log-prob."""
    flat = [p for ps in pairs for p in ps]
    start = time.perf_counter()
    scores = (scoring.loglik_scores_shared(model, flat, pad_id=pad_id, progress=progress) if model is not None
              else scoring.loglik_scores(logits_of, flat, pad_id=pad_id, batch_size=batch_size, progress=progress))
    seconds = time.perf_counter() - start
    rows, acc, acc_norm, at, nll = [], 0, 0, 0, 0.0
    for it, ps in zip(items, pairs):
        sums = scores[at : at + len(ps)]
        at += len(ps)
        best, best_norm, norm = scoring.pick(sums, it.options)
        acc += best == it.gold
        acc_norm += best_norm == it.gold
        nll -= sums[it.gold]
        rows.append({"where": it.where, "prompt": it.prompt, "options": it.options, "option_logprob": sums,
                     "option_logprob_per_byte": norm, "extracted": it.options[best], "pred": best,
                     "pred_norm": best_norm, "reference": it.options[it.gold], "gold": it.gold,
                     "correct": best == it.gold, "correct_norm": best_norm == it.gold})
    n = len(items)
    a, an = _accuracy(acc, n), _accuracy(acc_norm, n)
    summary = {**a, "acc": a["accuracy"], "acc_norm": an["accuracy"], "acc_norm_correct": acc_norm,
               "acc_norm_interval95": an["interval95"], "normalisation": "sum log-prob / option UTF-8 bytes",
               "interval": "wilson", "unparsed": 0, "gold_nll": nll / n if n else 0.0,
               "seconds": round(seconds, 3)}
    return summary, rows


def form_vocab(form) -> int:
    if form.model is not None:
        from neuroada_tools.hf.signature import input_vocab_size

        return input_vocab_size(form.model)
    return int(_text_config(form.config).vocab_size)


def _generate(items, ids, tok, model: ModelArgs, s: EvalSettings, rule, progress) -> tuple[dict, list[dict]]:
    if model.onnx is not None:
        source = sources.open_onnx(model.onnx, with_past=s.with_past, provider=s.provider)
    else:
        form = open_form(**vars(model), device=s.device)
        _require_lm(form.task, model.folder, "generation")
        sources.require_decoder(form.folder, form.config)
        source = sources.from_model(form.kind, form.folder, form.model)
    advance = _bar(progress, len(items))
    start = time.perf_counter()
    texts = []
    for first in range(0, len(ids), s.batch_size):
        batch = ids[first : first + s.batch_size]
        for g in generate_ids(source.new_session(), batch, s.max_new_tokens, eos_ids=source.eos_ids,
                              vocab=source.vocab, first_number=first):
            texts.append(completion_text(tok, g.prompt_ids, g.token_ids))
        if advance is not None:
            advance(len(batch))
    seconds = time.perf_counter() - start
    rows = scoring.generation_rows(items, texts, rule)
    correct = sum(r["correct"] for r in rows)
    summary = {"scoring": "generate", "rule": rule, "max_new_tokens": s.max_new_tokens, "form": source.describe(),
               **_accuracy(correct, len(rows)), "interval": "wilson",
               "unparsed": sum(not r["parsed"] for r in rows), "seconds": round(seconds, 3)}
    return summary, rows


def _classify(items, tok, model: ModelArgs, s: EvalSettings, limit) -> tuple[dict, list[dict]]:
    form = open_form(**vars(model), device=s.device, provider=s.provider)
    if form.task != "classification":
        raise ModelError(f"{model.folder}: classification records need a classifier; this is a {form.task} model")
    names = form.label_names
    gold = []
    for it in items:
        if isinstance(it.label, int):
            if not 0 <= it.label < len(names):
                raise DataError(f"{it.where}: label {it.label} is outside the model's {len(names)} labels")
            gold.append(it.label)
        elif it.label in names:
            gold.append(names.index(it.label))
        else:
            raise DataError(f"{it.where}: label {it.label!r} is none of the model's labels {names}")
    enc, _, _ = _encode_truncated(tok, [it.text for it in items], None, min(256, limit or 256))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    start = time.perf_counter()
    preds = []
    for first in range(0, len(items), s.batch_size):
        rows_ = range(first, min(first + s.batch_size, len(items)))
        width = max(len(enc["input_ids"][i]) for i in rows_)
        batch = {}
        for key, fill in (("input_ids", pad), ("attention_mask", 0), ("token_type_ids", 0)):
            if key in enc:
                batch[key] = torch.tensor([enc[key][i] + [fill] * (width - len(enc[key][i])) for i in rows_])
        preds += form.logits(batch).argmax(dim=-1).tolist()
    seconds = time.perf_counter() - start
    rows = [{"where": it.where, "prompt": it.text, "extracted": names[p], "pred": p, "reference": names[g],
             "correct": p == g} for it, p, g in zip(items, preds, gold)]
    correct = sum(r["correct"] for r in rows)
    return ({"scoring": "classification", "form": form.describe(), **_accuracy(correct, len(rows)),
             "interval": "wilson", "unparsed": 0, "seconds": round(seconds, 3)}, rows)


def write_predictions(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, written to a temporary name and renamed into place."""
    with atomic_file(Path(path)) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def human(summary: dict) -> str:
    s = summary
    lo, hi = s["interval95"]
    head = f"{s['examples']} examples from {s['data']} ({s['form']['kind']}: {s['form']['detail']}), {s['scoring']}"
    if s["scoring"] == "loglik":
        nlo, nhi = s["acc_norm_interval95"]
        lines = [head + f", prompt style {s['prompt_style']}",
                 f"  acc      {100 * s['acc']:.1f}%  (95% Wilson interval {100 * lo:.1f}-{100 * hi:.1f}%)",
                 f"  acc_norm {100 * s['acc_norm']:.1f}%  (95% Wilson interval {100 * nlo:.1f}-{100 * nhi:.1f}%, "
                 "per UTF-8 byte of the option)"]
    else:
        rule = f", answer rule {s['rule']}" if s.get("rule") else ""
        lines = [head + rule,
                 f"  accuracy {100 * s['accuracy']:.1f}%  ({s['correct']}/{s['examples']}; 95% Wilson interval "
                 f"{100 * lo:.1f}-{100 * hi:.1f}%), unparsed {s['unparsed']}"]
    lines.append(f"  {s['seconds']:.1f} s scoring")
    return "\n".join(lines)
