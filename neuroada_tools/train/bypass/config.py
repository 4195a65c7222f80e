"""The bypass's settings and rules: its modes, which modules it adapts, and that deltas stay fp32."""

from __future__ import annotations

import torch
from torch import nn

try:  # GPT-2 style layers store the weight as [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but keep the module importable
    Conv1D = None

#: ``fused`` (training default: refresh the selected entries in place, one matmul),
#: ``sparse`` (``x W^T + x S^T`` with ``S`` never formed: the sharding-safe path FSDP2 needs; see
#: ``layer.py``) or ``reference`` (``x W^T + x S^T`` with a dense ``S``, plain autograd; tests and parity).
MODES = ("fused", "sparse", "reference")
DELTA_ATTR = "neuroada_delta"
ROOT_STATE = "_neuroada_attach_state"


def adaptable(module: nn.Module) -> bool:
    """``nn.Linear`` / ``Conv1D`` or a subclass that keeps their forward (the bypass replaces it), or a
    quantized Linear (``quant.py``: bitsandbytes, torchao), whose own forward the bypass adds to.

    A layer that already carries a bypass is judged by the class it had before ``attach``, so the
    checks of a second adapter (``neuroada_tools.apply``) can run while the first is attached."""
    own = module.__dict__.get("_neuroada_base_cls", type(module))
    from neuroada_tools.train.bypass.quant import scheme_of

    if scheme_of(module) is not None:  # a quantized Linear: the bypass adds x S^T to its own forward
        return True
    for cls in (nn.Linear, Conv1D):
        if cls is not None and issubclass(own, cls) and own.forward is cls.forward:
            return True
    return False


def keep_fp32(fn, t: torch.Tensor) -> torch.Tensor:
    """Apply a module ``_apply`` function to a delta: follow device moves, never a dtype change."""
    new = fn(t)
    return new if new.dtype == torch.float32 else t.to(new.device)
