"""``apply``, ``set_active``, ``remove``, ``save_delta`` and ``list_adapters``: named NeuroAda adapters on a
loaded Hugging Face model (the bookkeeping is ``registry.py``).

The examples run as written in ``tests/test_adapters_docs.py``, in a folder that holds ``base/``
(a tiny Llama), its index ``base.k4.index.safetensors`` and two deltas made on it,
``a.delta.safetensors`` and ``b.delta.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from neuroada_tools import hf
from neuroada_tools.adapters import registry as reg_mod
from neuroada_tools.adapters.registry import Adapter, Registry, target_layers, unwrap
from neuroada_tools.check.binding import verify_loaded
from neuroada_tools.errors import CheckpointError, ModelError
from neuroada_tools.export.merge import merge_tensor
from neuroada_tools.io.checkpoint import Checkpoint, open_checkpoint
from neuroada_tools.io.outputs import atomic_file
from neuroada_tools.io.sidecar import (
    DeltaSidecar,
    IndexSidecar,
    check_delta_matches,
    read_delta,
    read_index,
    write_delta,
)
from neuroada_tools.train.bypass.config import DELTA_ATTR
from neuroada_tools.train.bypass.model import _check_dense


def apply(
    model: nn.Module,
    index: IndexSidecar | str | Path,
    delta: DeltaSidecar | str | Path | None = None,
    *,
    name: str = "default",
    merge: bool = False,
    head: bool = False,
    base: str | Path | None = None,
) -> nn.Module:
    """Add a NeuroAda adapter called ``name`` to ``model`` (in place) and make it the active one.

    ``index`` and ``delta`` are sidecar files or the objects ``read_index`` / ``read_delta`` return.
    Without ``delta`` the adapter's deltas are fp32 zeros, ready to train: every base parameter is
    frozen and only the deltas require grad (``head=True`` also trains the task head: the
    parameters outside ``model.base_model_prefix``, e.g. ``classifier.*``). A delta's dense tensors
    (a trained head) belong to the adapter: ``set_active`` swaps them with it, ``remove`` puts the
    base values back.

    With ``merge=True`` the delta is added into the weights in place, as ``neuroada-tools merge``
    does (``cast(fp32(W) + delta)`` at the selected positions, cast once), and no bypass is
    attached; ``remove`` writes the kept base values back. A merged adapter must be the model's only
    one.

    Refused before anything changes, naming the tensor: an index made from another base (the
    fingerprints of the loaded weights, ``check.binding.verify_loaded``), a delta made for another
    index or of other shapes (``check_delta_matches``), an index tensor the model lacks or holds in
    a layer that is not ``nn.Linear`` / ``Conv1D``; also a name already in use, and any adapter
    while one is merged. A weight loaded in a narrower dtype than the index's base is read from the
    checkpoint ``base`` (default: ``model.name_or_path`` when that is a local folder). Returns
    ``model``.

    >>> import neuroada_tools
    >>> from transformers import AutoModelForCausalLM
    >>> model = AutoModelForCausalLM.from_pretrained("base")
    >>> model = neuroada_tools.apply(model, "base.k4.index.safetensors", name="new")   # zeros, to train
    >>> sorted({n.rsplit(".", 1)[1] for n, p in model.named_parameters() if p.requires_grad})
    ['neuroada_delta']
    >>> model = neuroada_tools.apply(model, "base.k4.index.safetensors", "a.delta.safetensors", name="a")
    >>> neuroada_tools.list_adapters(model)
    {'new': 'inactive', 'a': 'active'}
    >>> merged = AutoModelForCausalLM.from_pretrained("base")
    >>> merged = neuroada_tools.apply(merged, "base.k4.index.safetensors", "a.delta.safetensors", merge=True)
    >>> neuroada_tools.list_adapters(merged)
    {'default': 'merged'}
    """
    model = unwrap(model)
    if not isinstance(index, IndexSidecar):
        index = read_index(index)
    index.check_rows()
    label = "delta"
    if delta is not None and not isinstance(delta, DeltaSidecar):
        label = Path(delta).name
        delta = read_delta(delta)
    if merge and delta is None:
        raise ModelError(f"apply {name!r}: merge=True needs a delta to merge")
    if merge and head:
        raise ModelError(f"apply {name!r}: head=True trains a head, but a merged adapter trains nothing")
    reg = reg_mod.registry(model)
    _refuse_conflicts(model, reg, name, merge)
    if reg is not None:  # adapters on one index share its rows
        index = next((a.index for a in reg.adapters.values() if a.index.digest and a.index.digest == index.digest),
                     index)

    # ---- checks: nothing changes until they all pass
    if reg is not None:
        reg_mod.restore_layers(model)  # the base at the selected positions, so the fingerprints see it
    verify_loaded(index, model, _checkpoint(model, base))
    if delta is not None:
        check_delta_matches(delta, index, label)
    targets = target_layers(model, index)
    dense = {pname: t for pname, _, t in _check_dense(model, delta.dense)} if delta is not None else {}
    head_names = set(dense) | (_head_names(model) if head else set())
    adapted = {f"{mod}.weight" for mod, _ in _module_names(model, targets)}
    clash = sorted(head_names & adapted)
    if clash:
        raise ModelError(f"apply {name!r}: head parameter {clash[0]!r} is also a weight the index adapts")

    # ---- change the model
    reg = reg_mod.registry(model, create=True)
    params = {}
    for tname, (module, _) in targets.items():
        value = torch.zeros(index.indices[tname].shape, dtype=torch.float32, device=module.weight.device)
        if delta is not None:
            value.copy_(delta.deltas[tname])
        params[tname] = nn.Parameter(value, requires_grad=not merge)
    model_params = dict(model.named_parameters())
    for n in sorted(head_names):
        if n not in reg.base_head:
            reg.base_head[n] = model_params[n].detach().clone()
    adapter = Adapter(
        name=name, index=index, params=params, head_names=tuple(sorted(head_names)),
        head={n: t.detach().clone() for n, t in dense.items()}, train_head=head,
        task=delta.task if delta is not None else "", info=dict(delta.info) if delta is not None else {},
    )
    reg.adapters[name] = adapter
    try:
        if merge:
            adapter.merged = _merge(targets, index, delta)
            reg.active = name
            reg_mod._load_heads(model, reg, adapter)
        else:
            reg_mod.activate(model, reg, name)
    except BaseException:
        del reg.adapters[name]
        if not reg.adapters:
            model.__dict__.pop(reg_mod.REGISTRY_ATTR, None)
        raise
    return model


def _refuse_conflicts(model: nn.Module, reg: Registry | None, name: str, merge: bool) -> None:
    if reg is None:
        if reg_mod.layers(model):
            raise ModelError("model has NeuroAda bypasses attached by bypass.attach(); call bypass.detach() first")
        return
    if name in reg.adapters:
        raise ModelError(f"apply: an adapter named {name!r} exists already; remove(model, {name!r}) it or pick "
                         "another name")
    merged = [a.name for a in reg.adapters.values() if a.merged is not None]
    if merged:
        raise ModelError(f"apply {name!r}: adapter {merged[0]!r} is merged into the weights, which are no longer "
                         f"the base an index was made from; remove(model, {merged[0]!r}) first")
    if merge:
        raise ModelError(f"apply {name!r}: cannot merge while adapters {reg.names()} are applied (a merged "
                         "model is another base); remove them first")


def _checkpoint(model: nn.Module, base: str | Path | None) -> Checkpoint | None:
    """The checkpoint to read a narrower-loaded weight from: ``base``, else the folder the model
    says it came from, if it is one that opens; else None (everything checked in memory)."""
    if base is not None:
        return open_checkpoint(base)
    where = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    if not where or not Path(where).is_dir():
        return None
    try:
        return open_checkpoint(where)
    except CheckpointError:
        return None


def _module_names(model: nn.Module, targets: dict) -> list[tuple[str, nn.Module]]:
    wanted = {id(m) for m, _ in targets.values()}
    return [(n, m) for n, m in model.named_modules() if id(m) in wanted]


def _head_names(model: nn.Module) -> set[str]:
    """The task head: parameters outside ``model.base_model_prefix`` (as ``train-sparse`` trains)."""
    prefix = getattr(model, "base_model_prefix", "")
    names: set[str] = set()
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):  # a task model wrapping its base
        names = {n for n, _ in model.named_parameters()
                 if not n.startswith(prefix + ".") and not n.endswith("." + DELTA_ATTR)}
    if not names:
        raise ModelError(f"head=True: {type(model).__name__} has no task head outside {prefix!r}")
    return names


def _merge(targets: dict, index: IndexSidecar, delta: DeltaSidecar) -> dict[str, torch.Tensor]:
    """Add each delta into its weight in place; return the base values at the selected positions.
    A refused tensor (an overflow) puts back the ones already merged before raising."""
    kept: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for tname, (module, layout) in targets.items():
                w = module.weight
                logical = w if layout == "out_in" else w.t()
                idx = index.indices[tname]
                kept[tname] = logical.gather(1, idx.to(device=w.device, dtype=torch.int64))
                out = merge_tensor(w.data, idx, delta.deltas[tname], layout == "in_out", w.dtype, inplace=True,
                                   name=tname)
                if out.data_ptr() != w.data_ptr():
                    w.data.copy_(out)
    except BaseException:
        with torch.no_grad():
            for tname, w0 in kept.items():
                module, layout = targets[tname]
                logical = module.weight if layout == "out_in" else module.weight.t()
                logical.scatter_(1, index.indices[tname].to(device=w0.device, dtype=torch.int64), w0)
        raise
    return kept


def set_active(model: nn.Module, name: str | None) -> None:
    """Make the adapter ``name`` the one the model computes with (``None``: the base alone).

    Nothing is reloaded: on the same index the attached layers swap their delta parameters, on
    another index the bypass is detached (the base bit for bit) and attached again. Each adapter
    keeps its own delta parameters, so an optimizer built while it was active still updates it
    after switching away and back (build one per adapter). The adapter's head comes with it.

    >>> import neuroada_tools, torch
    >>> from transformers import AutoModelForCausalLM
    >>> model = AutoModelForCausalLM.from_pretrained("base")
    >>> ids = torch.tensor([[1, 5, 9, 4]])
    >>> with torch.no_grad():
    ...     base = model(ids).logits
    >>> model = neuroada_tools.apply(model, "base.k4.index.safetensors", "a.delta.safetensors", name="a")
    >>> model = neuroada_tools.apply(model, "base.k4.index.safetensors", "b.delta.safetensors", name="b")
    >>> neuroada_tools.set_active(model, "a")
    >>> neuroada_tools.list_adapters(model)
    {'a': 'active', 'b': 'inactive'}
    >>> neuroada_tools.set_active(model, None)
    >>> with torch.no_grad():
    ...     torch.equal(model(ids).logits, base)
    True
    """
    model = unwrap(model)
    reg = reg_mod.require(model)
    if name is None:
        reg_mod.deactivate(model, reg)
    else:
        reg_mod.activate(model, reg, name)


def remove(model: nn.Module, name: str | None = None) -> None:
    """Remove the adapter ``name``, or every adapter (``None``); un-merge a merged one.

    The base values at the selected positions were kept when the adapter was attached or merged,
    and are written back (never ``W + delta - delta``): afterwards the weights are the base bit for
    bit, the base head is back, and ``requires_grad`` is as it was before the first ``apply``.
    Removing the active adapter leaves none active (``set_active`` picks another).

    >>> import neuroada_tools, torch
    >>> from transformers import AutoModelForCausalLM
    >>> model = AutoModelForCausalLM.from_pretrained("base")
    >>> before = {n: t.clone() for n, t in model.state_dict().items()}
    >>> model = neuroada_tools.apply(model, "base.k4.index.safetensors", "a.delta.safetensors", merge=True)
    >>> neuroada_tools.remove(model)
    >>> all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    True
    """
    model = unwrap(model)
    reg = reg_mod.registry(model)
    if reg is None:
        if name is None:
            return
        raise ModelError(f"no NeuroAda adapter named {name!r} (adapters: none)")
    names = [name] if name is not None else [n for n in reg.adapters if n != reg.active] + (
        [reg.active] if reg.active is not None else [])
    for n in names:
        reg_mod.drop(model, reg, n)


def list_adapters(model: nn.Module) -> dict[str, str]:
    """``{name: "active" | "inactive" | "merged"}`` in the order they were applied (``{}``: none).

    >>> import neuroada_tools
    >>> from transformers import AutoModelForCausalLM
    >>> neuroada_tools.list_adapters(AutoModelForCausalLM.from_pretrained("base"))
    {}
    """
    reg = reg_mod.registry(unwrap(model))
    if reg is None:
        return {}
    return {n: "merged" if a.merged is not None else "active" if n == reg.active else "inactive"
            for n, a in reg.adapters.items()}


def save_delta(model: nn.Module, path: str | Path, *, name: str | None = None, task: str | None = None,
               info: dict | None = None) -> DeltaSidecar:
    """Write adapter ``name``'s delta sidecar (default: the active adapter) to ``path``, atomically.

    The sidecar holds the deltas as they are now, whatever loop trained them, the adapter's head
    (and, while it is active, any other parameter that requires grad and is not a delta: a head
    unfrozen by hand) as ``dense`` tensors, the SHA-256 of its index, ``task`` (default: the
    applied delta's, else the one the model class names, e.g. ``classification`` for
    ``BertForSequenceClassification``) and ``info`` (merged over the applied delta's; a
    classification head adds ``num_labels`` and ``label_names`` from the model config, which
    ``neuroada-tools merge`` needs). Written under a temporary name and renamed into place (an
    existing file is replaced). Refuses a NaN or Inf value, naming the tensor. Returns the sidecar.

    >>> import neuroada_tools
    >>> from transformers import AutoModelForCausalLM
    >>> from neuroada_tools.io.sidecar import read_delta, read_index
    >>> model = AutoModelForCausalLM.from_pretrained("base")
    >>> model = neuroada_tools.apply(model, "base.k4.index.safetensors", name="mine")
    >>> # ... train the deltas in any loop ...
    >>> _ = neuroada_tools.save_delta(model, "mine.delta.safetensors")
    >>> delta = read_delta("mine.delta.safetensors", read_index("base.k4.index.safetensors"))
    >>> len(delta.deltas) == len(read_index("base.k4.index.safetensors").indices)
    True
    """
    model = unwrap(model)
    reg = reg_mod.require(model)
    if name is None:
        if reg.active is None:
            raise ModelError(f"save_delta: no adapter is active; pass name= (adapters: {reg.names()})")
        name = reg.active
    adapter = reg_mod.get(reg, name)
    if not adapter.index.digest:
        raise ModelError(f"save_delta {name!r}: its index has no SHA-256 (built in memory); write it with "
                         "write_index and apply the file, so the delta can name it")
    deltas = reg_mod.delta_values(model, adapter)
    dense = {n: t.to("cpu", torch.float32) for n, t in reg_mod.head_values(model, reg, adapter).items()}
    for n, t in [*deltas.items(), *dense.items()]:
        if not bool(torch.isfinite(t).all()):
            raise ModelError(f"save_delta {name!r}: {n!r} holds NaN or Inf; not saving it")
    task = task if task is not None else adapter.task or hf.task_of_architectures([type(model).__name__]) or ""
    full_info = {**adapter.info, **_label_info(model, task, dense), **(info or {})}
    sidecar = DeltaSidecar(index_digest=adapter.index.digest, deltas=deltas, dense=dense, task=task, info=full_info)
    path = Path(path)
    with atomic_file(path) as tmp:
        write_delta(tmp, sidecar)
    return sidecar


def _label_info(model: nn.Module, task: str, dense: dict) -> dict:
    config = getattr(model, "config", None)
    if task != "classification" or not dense or config is None:
        return {}
    n = int(getattr(config, "num_labels", 0) or 0)
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n)]
    return {"num_labels": n, "label_names": names}
