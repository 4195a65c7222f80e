"""The parity check: unmerged (base + bypass, reference path) vs merged torch vs ONNX Runtime.

The reference is the base model loaded with transformers, with the index and delta attached on the
unfused reference path (``x W^T + x S^T``) and the delta's dense head loaded. Inputs are fresh:
``parity.PARITY_BATCH x PARITY_SEQ`` random tokens with right padding, a shape the export never saw.
Tolerances per dtype are ``parity.TOLERANCES``. A merge where the base or the output is bf16/fp16 also
gets ``merged_vs_unmerged_fp32``, the tight comparison in fp32 arithmetic of ``check/rounding.py``.
An unexpected exception inside a comparison becomes one ``ParityError`` line naming it
(``comparison_errors``). ``generate=N`` adds greedy generation parity (``check/generation.py``): the
same N new tokens from every form, enforced on fp32.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from neuroada_tools.check.generation import check_generation
from neuroada_tools.check.generation import human as human_generation
from neuroada_tools.check.onnx_weights import check_onnx_weights
from neuroada_tools.check.onnx_weights import human as human_weights
from neuroada_tools.check.parity import (
    EXACT,
    NOISE_FACTOR,
    PARITY_BATCH,
    PARITY_SEQ,
    ParityReport,
    calibrated_tolerance,
    check_with_past,
    compare_logits,
    evaluated_in,
    make_fresh_inputs,
    run_onnx,
    run_torch,
    tolerance_for,
)
from neuroada_tools.check.rounding import check_rounding, needs_rounding_check
from neuroada_tools.errors import NeuroAdaError, ParityError
from neuroada_tools.forms import load_unmerged  # noqa: F401  (public name of this module before forms/)
from neuroada_tools.forms import load_unmerged_with_delta as _load_unmerged
from neuroada_tools.generate.genai import genai_logits, is_genai_folder
from neuroada_tools.generate.genai import precision_of as genai_precision
from neuroada_tools.hf import DTYPE_NAMES, first_line, load_model
from neuroada_tools.hf.signature import first_id_within, input_vocab_size, uses_token_type_ids
from neuroada_tools.train import bypass


@dataclass
class CheckResult:
    """One line per comparison: name -> report fields plus tolerance and verdict."""

    dtype: str
    task: str
    batch: int
    seq: int
    comparisons: dict[str, dict] = field(default_factory=dict)
    generation: dict | None = None
    noise: dict | None = None  # the measured noise floor the calibrated tolerances come from
    onnx_weights: dict | None = None  # check/onnx_weights.py: the adapted weights in the graph, bit for bit

    @property
    def passed(self) -> bool:
        weights_ok = self.onnx_weights is None or self.onnx_weights["passed"]
        return all(c["passed"] for c in self.comparisons.values()) and self.generation_passed and weights_ok

    @property
    def generation_passed(self) -> bool:
        return self.generation is None or self.generation["passed"]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d


def _dtype_key(model: torch.nn.Module) -> str:
    return DTYPE_NAMES.get(next(model.parameters()).dtype, "fp32")


_LOOSENESS = {"fp32": 0, "fp16": 1, "bf16": 2}


def _folder_dtype_key(folder: Path) -> str:
    """The dtype a merged or ONNX folder's config.json records (``fp32`` when it says none)."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "fp32"
    name = (cfg.get("dtype") or cfg.get("torch_dtype")) if isinstance(cfg, dict) else None
    return DTYPE_NAMES.get(getattr(torch, str(name), None), "fp32")


def _looser(a: str, b: str) -> str:
    """The lower of two precisions: a bf16 merge of an fp32 base is held to the bf16 tolerance."""
    return a if _LOOSENESS[a] >= _LOOSENESS[b] else b


def run_check(
    model_dir: Path,
    index_path: Path,
    delta_path: Path,
    *,
    merged_dir: Path | None = None,
    onnx_dir: Path | None = None,
    with_past: bool = False,
    provider: str = "cpu",
    batch: int = PARITY_BATCH,
    seq: int = PARITY_SEQ,
    seed: int = 1234,
    generate: int = 0,
    raise_on_failure: bool = True,
) -> CheckResult:
    """Compare logits (and with ``generate=N``, N greedy tokens); raise ``ParityError`` (exit code 1)
    if any comparison is over tolerance or the fp32 tokens differ."""
    unmerged, task, delta = _load_unmerged(Path(model_dir), Path(index_path), Path(delta_path))
    key = _dtype_key(unmerged)
    cfg = unmerged.config
    with comparison_errors("unmerged_reference"):
        vocab = input_vocab_size(unmerged)
        # the pad id, else eos, where the embedding holds it (tiny models' configs may not)
        pad = first_id_within([cfg.pad_token_id, getattr(cfg, "eos_token_id", None)], vocab)
        uses_tt = uses_token_type_ids(unmerged)
        inputs = make_fresh_inputs(cfg, batch=batch, seq=seq, seed=seed, pad_token_id=pad,
                                   with_token_type_ids=uses_tt, vocab_size=vocab)
        if task == "multiple-choice":
            inputs = {k: v.unsqueeze(1).expand(-1, 2, -1).contiguous() for k, v in inputs.items()}
            mask = torch.ones(batch, dtype=torch.long)
        else:
            mask = inputs["attention_mask"]
        ref_own = run_torch(unmerged, inputs)  # the reference path in the base dtype
        bypass.set_mode(unmerged, "fused")  # the merge's own arithmetic, in the base dtype
        try:
            fused = run_torch(unmerged, inputs)
        finally:
            bypass.set_mode(unmerged, "reference")
        with evaluated_in(unmerged):
            ref = run_torch(unmerged, inputs)  # the same model evaluated in float64: the reference
        # the noise floor: the larger deviation of the model's two runs in its dtype (two summation orders)
        noise = max(compare_logits(ref, ref_own, mask), compare_logits(ref, fused, mask), key=lambda r: r.max_abs)
    result = CheckResult(dtype=key, task=task, batch=batch, seq=seq)

    # a merge written in a lower precision than the base (merge --dtype bf16) is held to that one's
    # table tolerance; the tight fp32 comparison below is what catches a wrong entry there
    out_key = _looser(key, _folder_dtype_key(merged_dir if merged_dir is not None else onnx_dir or model_dir))
    calibrated = out_key == key
    form_tol = calibrated_tolerance(noise) if calibrated else None
    result.noise = {"max_abs": noise.max_abs, "ref_scale": noise.ref_scale, "factor": NOISE_FACTOR,
                    "calibrated": calibrated, "what": f"unmerged {key} (reference and fused paths) vs float64"}

    def record(name: str, report: ParityReport, kind: str) -> None:
        if kind == "exact":
            tol = EXACT
        elif kind == "tight":
            tol = tolerance_for(key, "tight")
        else:
            tol = form_tol if form_tol is not None else tolerance_for(out_key, kind)
        limit = tol.limit(report.ref_scale)
        result.comparisons[name] = {
            "max_abs": report.max_abs, "max_rel": report.max_rel, "argmax_agreement": report.argmax_agreement,
            "positions": report.positions, "tolerance": limit, "passed": report.max_abs <= limit,
        }

    merged = None
    if merged_dir is not None:
        with comparison_errors("merged_vs_unmerged"):
            merged = load_model(Path(merged_dir), task)
            merged.eval()
            merged_logits = run_torch(merged, inputs)
            if _folder_dtype_key(Path(merged_dir)) == key:  # the fused bypass does the merge's arithmetic
                record("merged_vs_fused", compare_logits(fused, merged_logits, mask), "exact")
            record("merged_vs_unmerged", compare_logits(ref, merged_logits, mask), "merged")
    if onnx_dir is not None and is_genai_folder(onnx_dir):  # onnxruntime-genai's build; enforced in fp32 only
        with comparison_errors("onnx_vs_unmerged"):
            precision = genai_precision(Path(onnx_dir))
            record("onnx_vs_unmerged", compare_logits(ref, genai_logits(Path(onnx_dir), dict(inputs), provider), mask),
                   "onnx")
            c = result.comparisons["onnx_vs_unmerged"]
            c.update(runtime="onnxruntime-genai", precision=precision, enforced=precision == "fp32")
            c["passed"] = c["passed"] or not c["enforced"]
    elif onnx_dir is not None:
        with comparison_errors("onnx_vs_unmerged"):
            onnx_path = Path(onnx_dir) / "model.onnx"
            record("onnx_vs_unmerged", compare_logits(ref, run_onnx(onnx_path, dict(inputs), provider), mask), "onnx")
        with comparison_errors("onnx_weights"):
            out_dtype = {v: k for k, v in DTYPE_NAMES.items()}[_folder_dtype_key(Path(onnx_dir))]
            graphs = [g for g in (onnx_path, Path(onnx_dir) / "model_with_past.onnx") if g.exists()]
            result.onnx_weights = check_onnx_weights(unmerged, graphs, out_dtype)
        past = Path(onnx_dir) / "model_with_past.onnx"
        with_past = with_past or past.exists()
        if with_past:
            with comparison_errors("onnx_with_past_step"), evaluated_in(unmerged):
                record("onnx_with_past_step", check_with_past(unmerged, past, inputs, provider=provider), "onnx")
    if generate:
        with comparison_errors("generate"):
            if task != "causal-lm":
                raise ParityError(f"check --generate needs a causal-LM model; this delta is for {task}")
            bypass.set_mode(unmerged, "fused")  # the merge's own arithmetic: a merged model decodes the same bits
            result.generation = check_generation(
                unmerged, Path(model_dir), merged=merged, onnx_dir=onnx_dir, with_past=with_past, provider=provider,
                new_tokens=generate, batch=batch, seq=seq, seed=seed, enforced=key == "fp32")
    if merged is not None and needs_rounding_check(unmerged, merged):  # last: it upcasts ``merged`` in place
        with comparison_errors("merged_vs_unmerged_fp32"):
            bypass.set_mode(unmerged, "reference")
            record("merged_vs_unmerged_fp32", check_rounding(unmerged, merged, inputs, mask, delta.dense), "tight")
    del merged
    if raise_on_failure and not result.passed:
        bad = [f"{n}: max abs {c['max_abs']:.3g} > tolerance {c['tolerance']:.3g} "
               f"(argmax agreement {100 * c['argmax_agreement']:.1f}%)"
               for n, c in result.comparisons.items() if not c["passed"]]
        w = result.onnx_weights
        if w is not None and not w["passed"]:
            bad.append(f"onnx_weights: {w['tensors'] - w['matched']} of {w['tensors']} adapted weights not in the "
                       f"graph bit for bit (first: {w['missing'][0]})")
        if not result.generation_passed:
            bad.append(result.generation["mismatch"])
        raise ParityError(f"parity check failed ({key}): " + "; ".join(bad))
    return result


@contextmanager
def comparison_errors(name: str) -> Iterator[None]:
    """Turn an unexpected exception inside one comparison into a one-line ``ParityError`` naming it.

    Errors of this project (``NeuroAdaError``: already one line) pass through unchanged, as do
    ``KeyboardInterrupt`` and ``SystemExit``. Example: an ``IndexError`` in the merged model's
    forward becomes ``parity check 'merged_vs_unmerged' failed: IndexError: index out of range in
    self`` (exit code 1 from the CLI, no traceback; the original stays chained as ``__cause__``).
    """
    try:
        yield
    except NeuroAdaError:
        raise
    except Exception as e:
        kind, text = type(e).__name__, first_line(e)
        raise ParityError(f"parity check {name!r} failed: {kind}" + ("" if text == kind else f": {text}")) from e


def human(result: dict) -> str:
    lines = [f"parity ({result['dtype']}, {result['task']}, fresh inputs batch {result['batch']} x seq "
        f"{result['seq']}, padded):"]
    n = result.get("noise")
    if n is not None and n["calibrated"]:
        lines.append(f"  noise floor ({n['what']}) max abs {n['max_abs']:.3e}: forms within {n['factor']:g}x that "
                     "+ 1e-4 x max abs logit of the float64 evaluation; merged_vs_fused exact")
    width = max([22, *map(len, result["comparisons"])])
    for n, c in result["comparisons"].items():
        lines.append(
            f"  {n:{width}s} max abs {c['max_abs']:.3e}  max rel {c['max_rel']:.3e}  argmax "
                f"{100 * c['argmax_agreement']:.1f}%  "
            f"tol {c['tolerance']:.1e}  {'ok' if c['passed'] else 'FAILED'}"
            + ("" if c.get("enforced", True) else f" (reported, not enforced: {c.get('precision')})")
        )
    if result.get("onnx_weights") is not None:
        lines.append(human_weights(result["onnx_weights"]))
    if result.get("generation") is not None:
        lines.append(human_generation(result["generation"]))
    return "\n".join(lines)
