"""The tight parity comparison of a low-precision merge: the merged weights against ``W + delta``
rounded once, both models run in fp32 arithmetic.

Why: a bf16/fp16 forward differs from any other evaluation order by a fraction of the logit scale,
so the low-precision comparison (``parity.TOLERANCES[...]["merged"]``, bf16 ``1e-3 + 0.1 x scale``)
is loose enough to pass a merge that adds one delta entry at the wrong column of one row
(``tests/test_parity_rounding.py`` shows such a merge passing it). Here the arithmetic noise is
taken out, and only the weights can differ:

* merged side: the merged model's weights upcast to fp32 (exact), run in fp32;
* reference side: per parameter of the merged model, the unmerged model's base value upcast to fp32
  (exact); for an adapted weight plus ``scatter(delta)`` added in fp32; rounded once to the dtype
  the merged model holds that parameter in, then upcast to fp32 again. That is what the merge must
  have written (``cast(fp32(W) + scatter(delta))``), computed here from the bypass's own index and
  delta with ``scatter_add_``, independently of ``export/merge.py``. Dense task-head tensors come
  from the delta sidecar (fp32), rounded the same way. Run in the same fp32 model.

A correct merge gives bit-identical weights on both sides, so the logits agree exactly (0 on every
fixture; see ``parity.TOLERANCES[...]["tight"]`` for the figures and the bound).

What it leaves out: loading the models (``check/run.py``), the tolerance table and the comparison
itself (``check/parity.py``), fp32 merges (their low-precision comparison already is fp32).
"""

from __future__ import annotations

import torch
from torch import nn

from neuroada_tools.check.parity import ParityReport, compare_logits, run_torch
from neuroada_tools.errors import ParityError
from neuroada_tools.io.names import match_names

LOW_PRECISION = (torch.bfloat16, torch.float16)


def needs_rounding_check(unmerged: nn.Module, merged: nn.Module) -> bool:
    """True when either model holds a bf16/fp16 floating-point parameter (the tight check applies)."""
    return any(p.dtype in LOW_PRECISION for m in (unmerged, merged) for p in m.parameters())


def _adapted(unmerged: nn.Module) -> dict[str, nn.Module]:
    """``{weight parameter name: adapted module}`` for every bypass attached to ``unmerged``."""
    out = {}
    for name, module in unmerged.named_modules():
        if hasattr(module, "neuroada_idx") and hasattr(module, "neuroada_delta"):
            out[f"{name}.weight" if name else "weight"] = module
    return out


def reference_value(base: torch.Tensor, dtype: torch.dtype, module: nn.Module | None = None) -> torch.Tensor:
    """``fp32(cast_dtype(fp32(base) + scatter(delta)))`` for one parameter; without ``module`` (not
    adapted) ``fp32(cast_dtype(fp32(base)))``. ``module`` is an adapted layer of the unmerged model:
    its ``neuroada_idx`` / ``neuroada_delta`` address the logical ``[d_out, d_in]`` weight, i.e.
    columns of the stored tensor for a Conv1D (``neuroada_layout == "in_out"``).

    Example (bf16, one row, k=1): ``base = [[1.0, 0.5]]``, ``idx = [[1]]``, ``delta = [[2**-10]]``
    -> fp32 ``[[1.0, 0.5009765625]]`` -> bf16 ``[[1.0, 0.5]]`` (the update is below bf16 resolution at
    0.5) -> fp32 ``[[1.0, 0.5]]``; with ``delta = [[2**-7]]``: ``[[1.0, 0.5078125]]``.
    """
    value = base.detach().to(torch.float32, copy=True)
    if module is not None:
        logical = value if module.neuroada_layout == "out_in" else value.t()
        idx = module.neuroada_idx.to(device=value.device, dtype=torch.int64)
        delta = module.neuroada_delta.detach().to(device=value.device, dtype=torch.float32)
        logical.scatter_add_(1, idx, delta)  # index rows hold distinct columns: one fp32 add per entry
    return value.to(dtype).to(torch.float32)


def check_rounding(
    unmerged: nn.Module,
    merged: nn.Module,
    inputs: dict[str, torch.Tensor],
    attention_mask: torch.Tensor,
    dense: dict[str, torch.Tensor] | None = None,
) -> ParityReport:
    """Logits of the reference weights (``reference_value`` of every parameter) against the merged
    weights, both in fp32 in the same model; the report's reference is the former.

    ``unmerged``: the base model with the bypasses attached (its weights are the base values: the
    reference mode leaves them clean). ``dense``: the delta sidecar's dense tensors (fp32), by model
    name; they replace the base values of those parameters. ``merged`` is used up: it is upcast to
    fp32 in place and then given the reference weights, so pass a model you no longer need.

    Raises ``ParityError`` when a merged parameter has no counterpart of the same shape in
    ``unmerged``.
    """
    dtypes = {n: p.dtype for n, p in merged.named_parameters()}
    base = dict(unmerged.named_parameters())
    adapted = _adapted(unmerged)
    dense = dense or {}
    dense_names = {v: k for k, v in match_names(sorted(dense), list(dtypes)).items()}
    for name, p in merged.named_parameters():
        src = dense[dense_names[name]] if name in dense_names else base.get(name)
        if src is None or tuple(src.shape) != tuple(p.shape):
            found = "none" if src is None else f"shape {list(src.shape)}"
            raise ParityError(
                f"merged parameter {name!r} {list(p.shape)} has no counterpart in the unmerged model (found {found})"
            )
    merged.float()
    other = run_torch(merged, inputs)
    with torch.no_grad():
        for name, p in merged.named_parameters():
            src = dense[dense_names[name]] if name in dense_names else base[name]
            module = None if name in dense_names else adapted.get(name)
            p.copy_(reference_value(src, dtypes[name], module))
    reference = run_torch(merged, inputs)
    return compare_logits(reference, other, attention_mask)
