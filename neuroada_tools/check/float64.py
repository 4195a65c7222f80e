"""Evaluate a model in float64 in place, and give every tensor back exactly: the calibrated parity reference.

``check/parity.py`` compares each form of a tuned model with the unmerged model evaluated in float64
(its module docstring, "Calibrated"); this is the context manager that does it without a copy of the
model. What it leaves out: running the model (``parity.run_torch``) and comparing (``parity.compare_logits``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def evaluated_in(model: nn.Module, dtype: torch.dtype = torch.float64) -> Iterator[nn.Module]:
    """Run ``model`` with every floating-point parameter and buffer in ``dtype``; restore each after.

    The restore is exact (float64 holds every fp32, bf16 and fp16 value), tensor by tensor, so a bf16
    base keeps its fp32 deltas fp32. Tied parameters are converted once. Memory while inside: the
    model's floating tensors in ``dtype`` (2x an fp32 model for float64), converted one at a time.
    Example: ``with evaluated_in(model): logits64 = run_torch(model, inputs)``.
    """
    changed: list[tuple[dict, str, torch.dtype, bool]] = []
    seen: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            for store, is_param in ((module._parameters, True), (module._buffers, False)):
                for name, t in store.items():
                    if t is None or not t.is_floating_point() or t.dtype == dtype or id(t) in seen:
                        continue
                    seen.add(id(t))
                    changed.append((store, name, t.dtype, is_param))
                    if is_param:
                        t.data = t.data.to(dtype)
                    else:
                        store[name] = t.to(dtype)
    for module in model.modules():  # the fused layer's record of its last write no longer holds
        if hasattr(module, "_neuroada_written"):
            object.__setattr__(module, "_neuroada_written", None)
    try:
        yield model
    finally:
        with torch.no_grad():
            for store, name, orig, is_param in changed:
                t = store[name]
                if is_param:
                    t.data = t.data.to(orig)
                else:
                    store[name] = t.to(orig)
        for module in model.modules():
            if hasattr(module, "_neuroada_written"):
                object.__setattr__(module, "_neuroada_written", None)
