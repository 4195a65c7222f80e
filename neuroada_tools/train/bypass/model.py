"""Model surgery: attach bypasses to the weights an index names, switch modes, detach or merge
them, and collect the trained deltas into a sidecar."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from neuroada_tools.errors import ModelError, SidecarError
from neuroada_tools.io.names import match_names
from neuroada_tools.io.sidecar import DeltaSidecar, IndexSidecar, check_delta_matches
from neuroada_tools.train.bypass.config import (
    DELTA_ATTR,
    MODES,
    ROOT_STATE,
    adaptable,
)
from neuroada_tools.train.bypass.layer import _bypass_class, _BypassMixin
from neuroada_tools.train.bypass.quant import logical_shape, scheme_of


def _bypassed(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BypassMixin)]


@dataclass
class _AttachState:
    """What ``attach`` changed outside the adapted modules, so ``detach`` can undo it."""

    # weak references: a parameter replaced since (FSDP2 shards into new ones) must be freeable
    requires_grad: dict[int, tuple[weakref.ref, bool]] = field(default_factory=dict)
    dense_backup: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)


def attach(
    model: nn.Module, index: IndexSidecar, delta: DeltaSidecar | None = None, *, mode: str = "fused"
) -> dict[str, nn.Parameter]:
    """Add a NeuroAda bypass to every weight named in ``index``; return ``{index name: delta}``.

    Every parameter of ``model`` is frozen (``requires_grad=False``) and only the new fp32 deltas
    (zeros, or the values of ``delta``) are trainable; unfreeze a task head yourself. Index names are
    checkpoint names, mapped onto the model with ``match_names`` (``encoder.layer.0...`` finds
    ``bert.encoder.layer.0...``). With ``delta``, the sidecar must match the index
    (``check_delta_matches``: digest, names, shapes) and its dense tensors are copied into the
    model's parameters of those names (``detach`` puts the previous values back).

    Raises ``ModelError`` naming the tensor when an index tensor has no parameter in the model, its
    module is not ``nn.Linear`` / ``Conv1D``, or its shape or layout disagrees with the index entry;
    ``SidecarError`` for a malformed index row or a delta that does not match. Nothing is changed
    when an error is raised.

    Example: ``params = attach(model, read_index("m.index.safetensors"))`` then
    ``torch.optim.AdamW(params.values(), lr=7e-4)``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, found {mode!r}")
    if _bypassed(model):
        raise ModelError("model already has NeuroAda bypasses attached; call detach() first")
    index.check_rows()
    param_names = [n for n, _ in model.named_parameters()]
    mapping = match_names(sorted(index.indices), param_names)
    plan = []
    for name in sorted(index.indices):
        plan.append(_check_target(model, index, name, mapping.get(name)))
    if delta is not None:
        check_delta_matches(delta, index)
    dense_plan = _check_dense(model, delta.dense) if delta is not None else []

    # everything checked: now change the model
    state = _AttachState()
    for p in model.parameters():
        state.requires_grad[id(p)] = (weakref.ref(p), p.requires_grad)
    with torch.no_grad():
        for _, p, t in dense_plan:
            state.dense_backup.append((p, p.detach().clone()))
            p.copy_(t)
    for p in model.parameters():
        p.requires_grad_(False)
    out: dict[str, nn.Parameter] = {}
    for name, module, idx in plan:
        out[name] = _install(module, name, idx, mode, None if delta is None else delta.deltas[name])
    object.__setattr__(model, ROOT_STATE, state)
    return out




def _check_target(
    model: nn.Module, index: IndexSidecar, name: str, pname: str | None
) -> tuple[str, nn.Module, torch.Tensor]:
    entry = index.entries.get(name)
    if entry is None:
        raise SidecarError(f"index: tensor {name!r} has no entry in neuroada.tensors")
    if pname is None:
        raise ModelError(f"index tensor {name!r}: the model has no parameter of that name")
    mod_name, _, leaf = pname.rpartition(".")
    module = model.get_submodule(mod_name) if mod_name else model
    if leaf != "weight" or not adaptable(module):
        raise ModelError(
            f"index tensor {name!r}: model parameter {pname!r} is not the weight of an nn.Linear or "
            f"Conv1D (found {type(module).__name__}.{leaf})"
        )
    want_layout = "out_in" if isinstance(module, nn.Linear) else "in_out"
    quant = scheme_of(module)
    if quant is not None:  # packed codes: the logical shape is the layer's, the weight is not floats
        if entry.layout != "out_in" or tuple(entry.shape) != logical_shape(module):
            raise ModelError(
                f"index tensor {name!r}: quantized ({quant}) layer {mod_name!r} is [d_out, d_in] = "
                f"{list(logical_shape(module))} out_in, the index was made for {list(entry.shape)} {entry.layout}"
            )
        return name, module, index.indices[name]
    if entry.layout != want_layout:
        raise ModelError(
            f"index tensor {name!r}: recorded layout {entry.layout!r}, but model parameter {pname!r} "
            f"belongs to {type(module).__name__}, which stores {want_layout!r}"
        )
    w = module.weight
    logical = tuple(w.shape) if want_layout == "out_in" else tuple(reversed(w.shape))
    if logical != tuple(entry.shape):
        raise ModelError(
            f"index tensor {name!r}: model weight {pname!r} has logical shape [d_out, d_in] = "
            f"{list(logical)}, the index was made for {list(entry.shape)}"
        )
    if not w.is_floating_point() or w.device.type == "meta":
        raise ModelError(
            f"index tensor {name!r}: model weight {pname!r} is {w.dtype} on {w.device}, not materialised floats"
        )
    idx = index.indices[name]  # rows validated once, by read_index or index.check_rows() in attach
    return name, module, idx


def _check_dense(model: nn.Module, dense: dict[str, torch.Tensor]) -> list[tuple[str, nn.Parameter, torch.Tensor]]:
    params = dict(model.named_parameters())
    mapping = match_names(sorted(dense), list(params))
    plan = []
    for name in sorted(dense):
        if name not in mapping:
            raise ModelError(f"delta: dense tensor {name!r}: the model has no parameter of that name")
        p = params[mapping[name]]
        if tuple(p.shape) != tuple(dense[name].shape):
            raise ModelError(
                f"delta: dense tensor {name!r} has shape {list(dense[name].shape)}, model parameter "
                f"{mapping[name]!r} has {list(p.shape)}"
            )
        plan.append((mapping[name], p, dense[name]))
    return plan


def _install(module: nn.Module, name: str, idx: torch.Tensor, mode: str, init: torch.Tensor | None) -> nn.Parameter:
    w = module.weight
    layout = "out_in" if isinstance(module, nn.Linear) else "in_out"
    quant = scheme_of(module)
    idx = idx.to(device=w.device, dtype=torch.int32).contiguous()  # no copy if already so
    d_out, k = idx.shape
    if quant is not None:  # nothing is ever written to a quantized weight: no W0_sel to keep
        w0 = torch.empty((d_out, 0), dtype=torch.float32, device=w.device)
    else:
        logical = w if layout == "out_in" else w.t()
        with torch.no_grad():
            w0 = logical.gather(1, idx)
    value = torch.zeros((d_out, k), dtype=torch.float32, device=w.device)
    if init is not None:
        value.copy_(init)
    delta = nn.Parameter(value)
    base_cls = type(module)
    module.__class__ = _bypass_class(base_cls)
    module.register_parameter(DELTA_ATTR, delta)
    module.register_buffer("neuroada_idx", idx, persistent=False)
    crow = torch.arange(d_out + 1, dtype=torch.int32, device=w.device) * k
    module.register_buffer("neuroada_crow", crow, persistent=False)
    module.register_buffer("neuroada_w0", w0, persistent=False)
    module.neuroada_name = name
    module.neuroada_mode = mode
    module.neuroada_layout = layout
    module.neuroada_quant = quant
    module._neuroada_dirty = False
    module._neuroada_written = None
    module._neuroada_base_cls = base_cls
    return delta


def _remove(module: nn.Module, *, keep_merged: bool) -> None:
    if keep_merged:
        module._neuroada_refresh()
    else:
        module._neuroada_restore()
    del module._parameters[DELTA_ATTR]
    for b in ("neuroada_idx", "neuroada_crow", "neuroada_w0"):
        del module._buffers[b]
    base_cls = module._neuroada_base_cls
    attrs = ("neuroada_name", "neuroada_mode", "neuroada_layout", "neuroada_quant", "_neuroada_dirty",
             "_neuroada_written")
    for a in (*attrs, "_neuroada_base_cls"):
        module.__dict__.pop(a, None)
    module.__class__ = base_cls


def _finish(model: nn.Module, *, keep_merged: bool) -> None:
    for _, m in _bypassed(model):
        _remove(m, keep_merged=keep_merged)
    states = [m.__dict__.pop(ROOT_STATE) for m in model.modules() if ROOT_STATE in m.__dict__]
    for state in states:
        _undo(state, keep_merged=keep_merged)


def _undo(state: _AttachState, *, keep_merged: bool) -> None:
    with torch.no_grad():
        if not keep_merged:
            for p, backup in state.dense_backup:
                p.copy_(backup)
    for ref, flag in state.requires_grad.values():
        p = ref()
        if p is not None:
            p.requires_grad_(flag)


def detach(model: nn.Module) -> None:
    """Remove every bypass: weights are the base bit for bit again (the base as cast by any
    ``model.to(dtype)`` since ``attach``), deltas and buffers are gone, the modules have their
    original class, ``requires_grad`` flags and dense tensors loaded by ``attach`` are as before.
    A model without bypasses is left as it is."""
    _finish(model, keep_merged=False)


def merge_in_place(model: nn.Module) -> None:
    """Bake the deltas into the weights and remove the bypasses.

    Each selected entry becomes ``cast(fp32(W0) + delta)`` in the weight's dtype, computed once;
    every other entry is untouched. This is exactly the weight the fused forward uses, so the
    merged model's logits equal the fused bypass's. Example: bf16 ``W0 = 1.0``, ``delta = 2**-9``
    gives ``bf16(1.001953125) = 1.0`` (below bf16 resolution), while ``delta = 2**-7`` gives
    ``1.0078125``. ``requires_grad`` flags are restored; dense tensors loaded by ``attach`` stay.

    A quantized layer (``quant.py``) has no weight to write into: ``ModelError``, nothing changed;
    merge into the full-precision checkpoint instead (``neuroada-tools merge``, QLoRA's convention).
    """
    for _, m in _bypassed(model):
        if m.neuroada_quant is not None:
            raise ModelError(
                f"{m.neuroada_name!r}: cannot merge into a {m.neuroada_quant}-quantized weight; merge the delta "
                "into the full-precision checkpoint (neuroada-tools merge)"
            )
    _finish(model, keep_merged=True)


def set_mode(model: nn.Module, mode: str) -> None:
    """Switch every bypass to ``"fused"``, ``"sparse"`` or ``"reference"``; the weights are left clean."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, found {mode!r}")
    layers = _bypassed(model)
    if not layers:
        raise ModelError("model has no NeuroAda bypasses; call attach() first")
    for _, m in layers:
        m._neuroada_restore()
        m.neuroada_mode = mode


def deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{index name: fp32 [d_out, k] delta}``, detached clones (safe to keep while training)."""
    return {m.neuroada_name: m.neuroada_delta.detach().clone() for _, m in _bypassed(model)}


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every parameter with ``requires_grad``: after ``attach`` the deltas
    (``<module>.neuroada_delta``) plus anything unfrozen since, e.g. a task head."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def count_trainable(model: nn.Module) -> int:
    """Number of trainable scalars. Example: one 4096x4096 Linear at k=20 gives 4096 * 20 = 81920."""
    return sum(p.numel() for _, p in trainable_parameters(model))


def make_delta_sidecar(
    model: nn.Module,
    index: IndexSidecar,
    *,
    dense: dict[str, torch.Tensor] | None = None,
    task: str = "",
    info: dict | None = None,
    values: dict[str, torch.Tensor] | None = None,
) -> DeltaSidecar:
    """A ``DeltaSidecar`` holding the model's current deltas for every tensor of ``index``.

    ``dense`` (model parameter name -> tensor, e.g. a trained classifier) is stored as detached fp32
    copies. ``values`` (index tensor name -> tensor) replaces the model's own deltas, e.g. the
    whole tensors gathered from FSDP2 shards. Raises ``ModelError`` if an index tensor has no
    bypass in ``model``.
    """
    current = deltas(model)
    if values is not None:
        current = {n: values.get(n, t) for n, t in current.items()}
    missing = [n for n in sorted(index.indices) if n not in current]
    if missing:
        raise ModelError(f"index tensor {missing[0]!r} has no NeuroAda bypass in the model")
    extra = sorted(set(current) - set(index.indices))
    if extra:
        raise ModelError(f"the model has a bypass for {extra[0]!r}, which is not in the index")
    return DeltaSidecar(
        index_digest=index.digest,
        deltas={n: current[n] for n in sorted(index.indices)},
        dense={n: t.detach().to(torch.float32).clone() for n, t in (dense or {}).items()},
        task=task,
        info=dict(info or {}),
    )
