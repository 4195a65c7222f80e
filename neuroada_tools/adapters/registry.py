"""Several named NeuroAda adapters on one model: the per-model registry and the switch between them.

The low-level bypass (``train/bypass/``) holds one attachment per model. This module keeps, on the
model object (a plain attribute, not a module or a buffer: ``state_dict`` never shows it), a
``Registry`` of named ``Adapter`` records; the *active* one is the attached bypass, the others are
nothing but their own tensors:

- per adapted weight, the fp32 ``[d_out, k]`` delta, an ``nn.Parameter`` that is the layer's own
  delta parameter while the adapter is active (so an optimizer built over it keeps working after a
  switch away and back);
- the index it was made on, shared by reference between adapters on the same index (the rows are
  not copied);
- the values of its task head, if it has one (``dense`` tensors of its delta, or a head trained
  with ``apply(..., head=True)``), kept while inactive; while active they are in the model.

So an extra adapter costs its own size, never a copy of a weight. Switching between adapters on
the same index swaps the delta parameters in the attached layers (after writing the base values
back at the selected positions); switching to another index detaches the bypass, which restores
the base bit for bit, and attaches again. The base values of every head parameter an adapter
claims are kept from the moment it is first claimed, so the base head comes back when no adapter
that has a head is active.

A *merged* adapter (``apply(..., merge=True)``) is added into the weights in place; the registry
keeps the base values at its selected positions (``W0``, in the weight's dtype) and writes them
back when it is removed, so un-merging never subtracts. While an adapter is merged it is the only
adapter of the model (the weights are no longer the base any index was made from).

Left out: FSDP-sharded models (apply before sharding; ``train-sparse --fsdp`` trains those), and
pickling a model with adapters (save the deltas with ``save_delta``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from neuroada_tools.errors import ModelError
from neuroada_tools.io.names import match_names
from neuroada_tools.io.sidecar import IndexSidecar
from neuroada_tools.train import bypass
from neuroada_tools.train.bypass.config import DELTA_ATTR
from neuroada_tools.train.bypass.layer import _BypassMixin
from neuroada_tools.train.bypass.model import _check_target

REGISTRY_ATTR = "_neuroada_adapters"


@dataclass
class Adapter:
    """One named adapter: its index, its deltas and its head (see the module docstring)."""

    name: str
    index: IndexSidecar
    #: index tensor name -> fp32 [d_out, k] delta; the attached layer's parameter while active
    params: dict[str, nn.Parameter]
    #: model parameter names of the adapter's task head (empty: no head)
    head_names: tuple[str, ...] = ()
    #: the head's values while the adapter is inactive (model parameter name -> tensor)
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    train_head: bool = False
    task: str = ""
    info: dict = field(default_factory=dict)
    #: for a merged adapter: index tensor name -> the base values at its selected positions
    merged: dict[str, torch.Tensor] | None = None


@dataclass
class Registry:
    """Every adapter of one model, which one is active, and what the first ``apply`` found."""

    adapters: dict[str, Adapter] = field(default_factory=dict)
    active: str | None = None
    #: head parameter name -> its value before any adapter wrote it
    base_head: dict[str, torch.Tensor] = field(default_factory=dict)
    #: parameter name -> requires_grad before the first apply
    flags: dict[str, bool] = field(default_factory=dict)
    mode: str = "fused"

    def names(self) -> str:
        return ", ".join(repr(n) for n in self.adapters) or "none"


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (else itself)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def registry(model: nn.Module, *, create: bool = False) -> Registry | None:
    """The model's registry; with ``create`` a new one (recording ``requires_grad`` flags) if none."""
    reg = model.__dict__.get(REGISTRY_ATTR)
    if reg is None and create:
        if layers(model):
            raise ModelError("model has NeuroAda bypasses attached by bypass.attach(); call bypass.detach() first")
        reg = Registry(flags={n: p.requires_grad for n, p in model.named_parameters()})
        object.__setattr__(model, REGISTRY_ATTR, reg)
    return reg


def require(model: nn.Module) -> Registry:
    """The model's registry, or ``ModelError`` saying that nothing was applied."""
    reg = registry(model)
    if reg is None:
        raise ModelError("model has no NeuroAda adapters; call neuroada_tools.apply() first")
    return reg


def get(reg: Registry, name: str) -> Adapter:
    """The adapter called ``name``, or ``ModelError`` listing the names there are."""
    if name not in reg.adapters:
        raise ModelError(f"no NeuroAda adapter named {name!r} (adapters: {reg.names()})")
    return reg.adapters[name]


def layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{index tensor name: adapted layer}`` of the attached bypass."""
    return {m.neuroada_name: m for m in model.modules() if isinstance(m, _BypassMixin)}


def params_by_name(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters())


def restore_layers(model: nn.Module) -> None:
    """Write the base values back at the attached bypass's selected positions (the next forward
    writes the deltas again): the weights are then the base, e.g. to fingerprint them."""
    for m in layers(model).values():
        m._neuroada_restore()


def _save_head(model: nn.Module, adapter: Adapter) -> None:
    params = params_by_name(model)
    adapter.head = {n: params[n].detach().clone() for n in adapter.head_names}


def _load_heads(model: nn.Module, reg: Registry, adapter: Adapter | None) -> None:
    """Write ``adapter``'s head (or the base head where it has none) into the model's parameters."""
    params = params_by_name(model)
    with torch.no_grad():
        for n, base in reg.base_head.items():
            value = adapter.head[n] if adapter is not None and n in adapter.head else base
            params[n].copy_(value)
    if adapter is not None:
        adapter.head = {}  # the values now live in the model


def _set_flags(model: nn.Module, reg: Registry, adapter: Adapter | None) -> None:
    if adapter is None:
        for n, p in model.named_parameters():
            p.requires_grad_(reg.flags.get(n, p.requires_grad))
        return
    params = params_by_name(model)
    for n in reg.base_head:  # every head some adapter claims: trainable only as the active one's
        params[n].requires_grad_(adapter.train_head and n in adapter.head_names)


def deactivate(model: nn.Module, reg: Registry) -> None:
    """Make no adapter active: the base weights bit for bit, the base head, the original flags."""
    if reg.active is None:
        return
    adapter = reg.adapters[reg.active]
    if adapter.merged is not None:
        raise ModelError(f"adapter {adapter.name!r} is merged into the weights; remove(model, {adapter.name!r}) "
                         "un-merges it")
    _save_head(model, adapter)
    _freeze(adapter)
    reg.mode = next(iter(layers(model).values())).neuroada_mode
    bypass.detach(model)
    reg.active = None
    _load_heads(model, reg, None)
    _set_flags(model, reg, None)


def activate(model: nn.Module, reg: Registry, name: str) -> None:
    """Make ``name`` the attached bypass (its deltas, index rows and head)."""
    adapter = get(reg, name)
    if reg.active == name:
        return
    current = reg.adapters.get(reg.active) if reg.active is not None else None
    if current is not None and current.merged is not None:
        raise ModelError(f"adapter {current.name!r} is merged into the weights; remove(model, {current.name!r}) "
                         "un-merges it")
    if current is not None and _same_index(current.index, adapter.index):
        _save_head(model, current)
        _freeze(current)
        for tname, layer in layers(model).items():
            layer._neuroada_restore()
            layer._neuroada_written = None
            layer._parameters[DELTA_ATTR] = _on_device(adapter.params[tname], layer.weight.device)
    else:
        deactivate(model, reg)
        bypass.attach(model, adapter.index, mode=reg.mode)  # checks the targets; freezes every parameter
        for tname, layer in layers(model).items():
            layer._parameters[DELTA_ATTR] = _on_device(adapter.params[tname], layer.weight.device)
    for p in adapter.params.values():
        p.requires_grad_(True)
    reg.active = name
    _load_heads(model, reg, adapter)
    _set_flags(model, reg, adapter)


def _freeze(adapter: Adapter) -> None:
    """An inactive adapter's deltas do not require grad (as PEFT's inactive adapters), so a stale
    optimizer step cannot move them; ``activate`` turns them on again."""
    for p in adapter.params.values():
        p.requires_grad_(False)


def _same_index(a: IndexSidecar, b: IndexSidecar) -> bool:
    if a is b:
        return True
    return bool(a.digest) and a.digest == b.digest


def _on_device(p: nn.Parameter, device: torch.device) -> nn.Parameter:
    if p.device != device:
        p.data = p.data.to(device)
    return p


def drop(model: nn.Module, reg: Registry, name: str) -> None:
    """Remove ``name`` from the registry, detaching or un-merging it first if it is in the model."""
    adapter = get(reg, name)
    if adapter.merged is not None:
        unmerge(model, adapter)
        reg.active = None
        _load_heads(model, reg, None)
    elif reg.active == name:
        deactivate(model, reg)
    del reg.adapters[name]
    if not reg.adapters:
        _load_heads(model, reg, None)
        _set_flags(model, reg, None)
        model.__dict__.pop(REGISTRY_ATTR, None)


def target_layers(model: nn.Module, index: IndexSidecar) -> dict[str, tuple[nn.Module, str]]:
    """``{index tensor name: (plain Linear / Conv1D module, layout)}``; ``ModelError`` naming the
    tensor when the model has no such weight, or one of another kind or shape (as ``attach``)."""
    mapping = match_names(sorted(index.indices), [n for n, _ in model.named_parameters()])
    out = {}
    for name in sorted(index.indices):
        _, module, _ = _check_target(model, index, name, mapping.get(name))
        out[name] = (module, "out_in" if isinstance(module, nn.Linear) else "in_out")
    return out


def unmerge(model: nn.Module, adapter: Adapter) -> None:
    """Write the kept base values back at a merged adapter's selected positions (no subtraction)."""
    if adapter.merged is None:
        return
    with torch.no_grad():
        for tname, (module, layout) in target_layers(model, adapter.index).items():
            w = module.weight
            logical = w if layout == "out_in" else w.t()
            idx = adapter.index.indices[tname].to(device=w.device, dtype=torch.int64)
            logical.scatter_(1, idx, adapter.merged[tname].to(device=w.device, dtype=w.dtype))
    adapter.merged = None


def delta_values(model: nn.Module, adapter: Adapter) -> dict[str, torch.Tensor]:
    """``{index tensor name: fp32 delta}`` of ``adapter`` as it is now (detached, on the CPU)."""
    return {n: p.detach().to("cpu", torch.float32).clone() for n, p in sorted(adapter.params.items())}


def head_values(model: nn.Module, reg: Registry, adapter: Adapter) -> dict[str, torch.Tensor]:
    """The head of ``adapter`` (from the model while it is active), plus, while it is active, any
    other parameter that requires grad and is not a delta (a head unfrozen by hand)."""
    if reg.active != adapter.name:
        return {n: t.detach().clone() for n, t in adapter.head.items()}
    params = params_by_name(model)
    names = set(adapter.head_names)
    if adapter.merged is None:
        names |= {n for n, p in params.items() if p.requires_grad and not n.endswith("." + DELTA_ATTR)}
    return {n: params[n].detach().clone() for n in sorted(names)}


def load_values(model: nn.Module, reg: Registry, adapter: Adapter, delta, label: str) -> None:
    """Copy a delta sidecar's values into ``adapter``: its delta parameters (in place, so an
    optimizer over them keeps them) and its head. ``SidecarError`` / ``ModelError`` naming the
    tensor when the sidecar does not fit the adapter's index or the model."""
    from neuroada_tools.io.sidecar import check_delta_matches
    from neuroada_tools.train.bypass.model import _check_dense

    if adapter.merged is not None:
        raise ModelError(f"{label}: adapter {adapter.name!r} is merged into the weights; its values are fixed")
    check_delta_matches(delta, adapter.index, label)
    dense = {pname: t for pname, _, t in _check_dense(model, delta.dense)}
    extra = sorted(set(dense) - set(adapter.head_names))
    active = reg.active == adapter.name
    if extra and not (active and all(params_by_name(model)[n].requires_grad for n in extra)):
        raise ModelError(f"{label}: dense tensor {extra[0]!r} is not part of adapter {adapter.name!r}")
    params = params_by_name(model)
    with torch.no_grad():
        for n, p in adapter.params.items():
            p.copy_(delta.deltas[n])
        for n, t in dense.items():
            if active:
                params[n].copy_(t)
            else:
                adapter.head[n] = t.detach().clone()
