"""The trainable NeuroAda bypass: attach fp32 deltas to a model's Linear / Conv1D weights.

For a frozen weight ``W`` (logical ``[d_out, d_in]``) and an index ``idx`` (int32 ``[d_out, k]``,
rows ascending), the bypass trains ``delta`` (fp32 ``[d_out, k]``) and the layer computes

    y = x W^T + x S^T + b,      S[i, idx[i, j]] = delta[i, j], 0 elsewhere.

Worked example (d_out=2, d_in=3, k=1): ``W = [[1, 2, 3], [4, 5, 6]]``, ``idx = [[2], [0]]``,
``delta = [[0.5], [-1]]``. Then ``S = [[0, 0, 0.5], [-1, 0, 0]]`` and ``W + S = [[1, 2, 3.5],
[3, 5, 6]]``; for ``x = [1, 1, 1]``, ``y = [6.5, 14]`` (+ b). With upstream gradient ``g = [1, 2]``
(one token), ``grad_delta[i, j] = g[i] * x[idx[i, j]] = [[1], [2]]`` and ``grad_x = g (W+S) =
[7, 12, 15.5]``.

Two ways to compute it (``mode``):

- ``"fused"`` (training default). Before every forward the selected entries of the weight are
  overwritten in place with ``W0_sel + delta`` (``W0_sel``: the base values at those positions,
  kept in the base dtype, so ``detach`` restores the base bit for bit). The forward is then one
  plain matmul with ``W' = W + S``. Backward (``_FusedBypass``): ``grad_x = g W'`` (what a frozen
  base computes anyway) and ``grad_delta = SDDMM(g^T, x)``: ``T * d_out * k`` multiply-adds in
  fp32 instead of the dense ``T * d_out * d_in`` of ``g^T x``. On CPU (fp32/bf16) the compiled
  kernel ``kernels/csrc/sddmm.c`` computes it (and ``kernels/csrc/refresh.c`` the per-forward refresh); elsewhere
  ``torch.sparse.sampled_addmm`` on the CSR pattern ``crow = arange(d_out + 1) * k, col = idx``
  (for k <= 2, and where ``sampled_addmm`` is unavailable, a per-column gather-multiply-sum
  instead). Saved for backward:
  ``x`` only (plus a Python handle on the layer); no copy of the weight, no dense weight gradient.
- ``"reference"``: ``x W^T + b`` plus ``x S^T`` with ``S`` built by ``scatter`` from ``delta``,
  plain autograd, the weight left clean. Slow and memory hungry; for tests and parity.

Module surgery. An adapted module keeps its identity, its parameters and its ``state_dict`` keys;
its class is swapped for a subclass (as ``torch.nn.utils.parametrize`` does) that adds the
parameter ``<module>.neuroada_delta`` and the non-persistent buffers ``neuroada_idx``,
``neuroada_w0`` and ``neuroada_crow``. ``state_dict()`` shows the base weight (the selected
entries are restored first; the next forward writes them again). ``load_state_dict`` of a base
weight re-captures ``W0_sel``.

Device and dtype moves after ``attach``: ``model.to(device)``, ``.cuda()``, ``.cpu()`` move the
deltas (and their grads) with the weights; ``model.to(dtype)``, ``.half()``, ``.bfloat16()``,
``.float()`` cast the base weights and ``W0_sel`` together (``detach`` then restores the cast
base) but leave deltas fp32. Build the optimizer after moving, as usual. The refresh is part of
the module's forward, so gradient checkpointing (reentrant or not) rewrites the same values when it
recomputes; the backward writes them again itself if something (``state_dict()``, ``set_mode``)
restored the base in between. CUDA takes the same path (``sampled_addmm`` has a CUDA kernel; not
exercised by the CPU test suite). Not supported while attached: pickling the whole module (save
``state_dict`` or ``make_delta_sidecar`` instead) and an optimizer step between a forward and its
backward (a ``RuntimeError`` says so). Untested: ``torch.compile`` and sharded weights (FSDP,
DeepSpeed ZeRO-3), where the in-place write would need the full weight.

Files: ``config.py`` (modes, adaptable modules, dtype rules), ``layer.py`` (the adapted layer and its
refresh), ``model.py`` (attach / detach / merge_in_place / set_mode, the delta sidecar), ``ops.py``
(the SDDMM and the fused autograd function). Left out: which weights to adapt
(``index/targets.py``), reading sidecar files (``io/sidecar.py``), the training loop
(``train/loop.py``), the streaming on-disk merge (``export/merge.py``).
"""

from neuroada_tools.kernels.sddmm import sddmm
from neuroada_tools.train.bypass.config import DELTA_ATTR, MODES
from neuroada_tools.train.bypass.model import (
    attach,
    count_trainable,
    deltas,
    detach,
    make_delta_sidecar,
    merge_in_place,
    set_mode,
    trainable_parameters,
)

__all__ = [
    "DELTA_ATTR", "MODES", "attach", "count_trainable", "deltas", "detach", "make_delta_sidecar", "merge_in_place",
    "sddmm", "set_mode", "trainable_parameters",
]
