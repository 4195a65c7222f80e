"""Check that an index sidecar belongs to a base checkpoint (presence, shape, layout, fingerprint).

``check_shapes`` is free (headers only); ``verify_base`` streams each adapted tensor once and
compares its fingerprint, so a sidecar made from another base of the same shapes is refused with
an error naming the first tensor that differs; ``verify_loaded`` does the same on the weights of a
model already loaded (training: the base is read once).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from neuroada_tools.errors import FingerprintError, ModelError
from neuroada_tools.io.checkpoint import Checkpoint
from neuroada_tools.io.names import match_names
from neuroada_tools.io.sidecar import IndexSidecar, verify_fingerprint


def check_shapes(index: IndexSidecar, ckpt: Checkpoint) -> None:
    """Every index tensor exists in the checkpoint with the recorded logical shape and layout."""
    where = str(ckpt.root)
    for name, entry in sorted(index.entries.items()):
        ref = ckpt.tensors.get(name)
        if ref is None:
            raise FingerprintError(f"{where}: base has no tensor {name!r} (the index was made from another model)")
        stored = tuple(ref.shape)
        expect = entry.shape[::-1] if entry.transposed else entry.shape
        if stored != tuple(expect):
            raise FingerprintError(
                f"{where}: {name!r} is stored with shape {list(stored)}, the index expects {list(expect)} "
                f"(layout {entry.layout})"
            )


def verify_base(index: IndexSidecar, ckpt: Checkpoint, progress: Callable[[int], None] | None = None,
                names: list[str] | None = None) -> None:
    """Stream the adapted tensors (or only ``names``) and compare fingerprints (``FingerprintError``)."""
    check_shapes(index, ckpt)
    names = sorted(index.entries) if names is None else sorted(names)
    buffer = ckpt.buffer_for(names)
    for name in names:
        stored = ckpt.read(name, buffer)
        logical = stored.t() if index.entries[name].transposed else stored
        verify_fingerprint(index, name, logical, str(ckpt.root))
        if progress:
            progress(ckpt.tensors[name].raw.nbytes)


_EXACT_IN = {  # loaded dtype -> stored dtypes whose values it holds exactly
    torch.float32: {"F32", "BF16", "F16"},
    torch.bfloat16: {"BF16"},
    torch.float16: {"F16"},
    torch.float64: {"F64", "F32", "BF16", "F16"},
}


def verify_loaded(index: IndexSidecar, model: torch.nn.Module, ckpt: Checkpoint | None = None) -> None:
    """Compare fingerprints on the weights ``model`` already loaded, so training reads the base once.

    A weight loaded in a dtype that holds the stored values exactly (the base's own dtype, or an
    upcast) is fingerprinted in memory. A weight loaded in a narrower dtype (``--dtype bf16`` over
    an fp32 base) has lost the bits the fingerprint hashes, so that tensor alone is streamed from
    the checkpoint again (the one case where the base is read twice). Raises ``FingerprintError``
    naming the first tensor that differs.

    Without ``ckpt`` (a model loaded elsewhere: ``neuroada_tools.apply``) the stored dtype is the one
    the index records, every weight is fingerprinted in memory, and a weight the model lacks is a
    ``ModelError`` naming it; a weight loaded narrower than the index's base is a
    ``FingerprintError`` (there is no file to read it from).

    A quantized layer (bitsandbytes, torchao: ``train/bypass/quant.py``) holds codes, not the base's
    values, so its tensor is always fingerprinted from the checkpoint file, never from dequantized
    weights; without ``ckpt`` that is a ``FingerprintError`` asking for the checkpoint.
    """
    from neuroada_tools.train.bypass.quant import scheme_of

    params = dict(model.named_parameters())
    quantized = {f"{n}.weight": scheme_of(m) for n, m in model.named_modules() if scheme_of(m) is not None}
    mapping = match_names(sorted(index.entries), list(params))
    from_file = []
    for name in sorted(index.entries):
        p = params.get(mapping.get(name, ""))
        scheme = quantized.get(mapping.get(name, ""))
        if scheme is not None:
            if ckpt is None:
                raise FingerprintError(
                    f"model: {name!r} is {scheme}-quantized, so its fingerprint cannot be checked in memory; "
                    "pass the full-precision base checkpoint, whose file is read instead"
                )
            from_file.append(name)
            continue
        if ckpt is not None:
            stored = ckpt.tensors[name].dtype if name in ckpt.tensors else None
        else:
            stored = index.entries[name].dtype
            if p is None:
                raise ModelError(f"index tensor {name!r}: the model has no parameter of that name")
            if stored not in _EXACT_IN.get(p.dtype, set()):
                raise FingerprintError(
                    f"model: {name!r} is loaded as {str(p.dtype).removeprefix('torch.')}, which does not hold the "
                    f"{stored} values the index was made from; load the model in {stored} or fp32 (or pass the "
                    "base checkpoint, whose file is read instead)"
                )
        if p is None or stored not in _EXACT_IN.get(p.dtype, set()):
            from_file.append(name)
            continue
        logical = p.detach().t() if index.entries[name].transposed else p.detach()
        verify_fingerprint(index, name, logical, str(ckpt.root) if ckpt is not None else "model")
    if from_file:
        verify_base(index, ckpt, names=from_file)
