"""Greedy generation parity (``check --generate N``): the same N new tokens from every form of the model.

Logit parity (``parity.py``) bounds the difference of one forward pass; generation parity checks
what a user sees: greedy decoding, step by step with each form's own cache, from the unmerged model
(base + bypass, reference path), the merged torch model and the ONNX model (``model_with_past.onnx``
fed its own presents, or ``model.onnx`` re-run per token where there is no with-past graph, or an
ORT GenAI folder on its runtime, ``generate/genai.py``) must give the same tokens. An int4 / fp16
GenAI build is compared and its token agreement reported (``agreement``: the share of the unmerged
model's tokens it reproduces before its first difference), not enforced. The prompts are the fresh
random inputs of the logit check (their real tokens, left-padded by each session), decoded as one
batch with the EOS ids of the unmerged model.

On fp32 a difference fails (exit code 1) with one line naming the comparison, the prompt, the first
differing new token and both tokens:
``greedy tokens differ: merged vs unmerged, prompt 2, new token 3 of 8: unmerged 17, merged 203``.
On bf16/fp16 the tokens are compared and reported but not enforced: a low-precision forward
legitimately flips near-ties, and a bf16/fp16 merge has the tight fp32 logit check instead
(``rounding.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from torch import nn

from neuroada_tools.check.parity import make_fresh_inputs
from neuroada_tools.generate.decode import Session, generate_ids
from neuroada_tools.generate.genai import precision_of
from neuroada_tools.generate.sources import open_onnx, special_ids, torch_session
from neuroada_tools.hf.signature import input_vocab_size


def fresh_prompts(model: nn.Module, *, batch: int, seq: int, seed: int, pad_id: int) -> list[list[int]]:
    """The real tokens of each row of ``parity.make_fresh_inputs`` (lengths ``seq``, random, ``seq // 2``)."""
    vocab = input_vocab_size(model)
    inputs = make_fresh_inputs(model.config, batch=batch, seq=seq, seed=seed, pad_token_id=pad_id, vocab_size=vocab)
    return [row[m.bool()].tolist() for row, m in zip(inputs["input_ids"], inputs["attention_mask"])]


def first_difference(ref: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> tuple[int, int, str, str] | None:
    """``(prompt, new token, reference token, other token)`` of the first difference (both 0-based
    positions), tokens as text (``"end"`` where a sequence stopped earlier); None when equal.

    Example: ``first_difference([[1, 2], [3, 4]], [[1, 2], [3, 5]])`` -> ``(1, 1, "4", "5")``.
    """
    for p, (a, b) in enumerate(zip(ref, other)):
        for i in range(max(len(a), len(b))):
            x = str(a[i]) if i < len(a) else "end"
            y = str(b[i]) if i < len(b) else "end"
            if x != y:
                return p, i, x, y
    return None


def check_generation(
    unmerged: nn.Module,
    model_dir: Path,
    *,
    merged: nn.Module | None = None,
    onnx_dir: Path | None = None,
    with_past: bool = True,
    provider: str = "cpu",
    new_tokens: int = 8,
    batch: int = 3,
    seq: int = 11,
    seed: int = 1234,
    enforced: bool = True,
) -> dict:
    """Greedy tokens of every given form against the unmerged model's; a dict for ``CheckResult``."""
    vocab = input_vocab_size(unmerged)
    eos, pad = special_ids(Path(model_dir), unmerged.config, vocab)
    prompts = fresh_prompts(unmerged, batch=batch, seq=seq, seed=seed, pad_id=pad)
    forms: dict[str, Callable[[], Session]] = {"unmerged": torch_session(unmerged, pad)}
    if merged is not None:
        forms["merged"] = torch_session(merged.eval(), pad)
    report_only = set()
    if onnx_dir is not None:
        onnx = open_onnx(Path(onnx_dir), with_past=with_past, provider=provider, vocab=vocab)
        name = "onnx_genai" if onnx.kind == "onnx-genai" else "onnx_with_past" if with_past else "onnx"
        forms[name] = onnx.new_session
        if onnx.kind == "onnx-genai" and precision_of(Path(onnx_dir)) != "fp32":
            report_only.add(name)  # an int4 / fp16 build: agreement reported, not enforced
    tokens = {}
    for name, new_session in forms.items():
        generated = generate_ids(new_session(), prompts, new_tokens, eos_ids=eos, vocab=vocab)
        tokens[name] = [g.token_ids for g in generated]
    mismatches, reported = [], []
    for name in list(forms)[1:]:
        diff = first_difference(tokens["unmerged"], tokens[name])
        if diff is not None:
            p, i, a, b = diff
            (reported if name in report_only else mismatches).append(
                f"{name.replace('_', ' ')} vs unmerged, prompt {p + 1}, new token {i + 1} of "
                f"{new_tokens}: unmerged {a}, {name.replace('_', ' ')} {b}")
    message = ("greedy tokens differ: " + "; ".join(mismatches)) if mismatches else None
    return {
        "new_tokens": new_tokens, "prompts": [list(p) for p in prompts], "eos_ids": eos, "tokens": tokens,
        "compared": [f"{n}_vs_unmerged" for n in list(forms)[1:]], "mismatch": message, "enforced": enforced,
        "passed": message is None or not enforced,
        "agreement": {n: token_agreement(tokens["unmerged"], tokens[n]) for n in list(forms)[1:]},
        "reported_only": sorted(report_only), "reported": "; ".join(reported) or None,
    }


def token_agreement(ref: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> float:
    """The share of the reference's new tokens that ``other`` reproduces before its first difference in
    each prompt. Example: ``token_agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]])`` -> 0.5."""
    total = sum(len(r) for r in ref)
    same = 0
    for r, o in zip(ref, other):
        for a, b in zip(r, o):
            if a != b:
                break
            same += 1
    return same / total if total else 1.0


def human(generation: dict) -> str:
    """One line: what was compared and whether the tokens agree."""
    g = generation
    what = ", ".join(g["compared"]) or "unmerged only"
    reported_only = g.get("reported_only") or []
    checked = [n for n in g["compared"] if n.removesuffix("_vs_unmerged") not in reported_only]
    verdict = ("same tokens" if g["mismatch"] is None else g["mismatch"]) if checked or not reported_only else ""
    if g["mismatch"] is not None and not g["enforced"]:
        verdict += " (not enforced below fp32)"
    if reported_only:  # an int4 / fp16 ORT GenAI build: how far it follows, not a verdict
        shares = ", ".join(f"{n} reproduces {100 * g['agreement'][n]:.0f}% of the unmerged tokens"
                           for n in reported_only)
        verdict += ("; " if verdict else "") + f"{shares} (reported, not enforced)"
        if g.get("reported"):
            verdict += f": {g['reported']}"
    status = "ok" if g["passed"] else "FAILED"
    size = f"{g['new_tokens']} new tokens x {len(g['prompts'])} prompts"
    return f"  greedy generation, {size} ({what}): {verdict}  {status}"

