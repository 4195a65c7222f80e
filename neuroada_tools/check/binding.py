"""Check that an index sidecar belongs to a base checkpoint (presence, shape, layout, fingerprint).

``check_shapes`` is free (headers only); ``verify_base`` streams each adapted tensor once and
compares its fingerprint, so a sidecar made from another base of the same shapes is refused with
an error naming the first tensor that differs.
"""

from __future__ import annotations

from collections.abc import Callable

from neuroada_tools.io.checkpoint import Checkpoint
from neuroada_tools.errors import FingerprintError
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


def verify_base(index: IndexSidecar, ckpt: Checkpoint, progress: Callable[[int], None] | None = None) -> None:
    """Stream the adapted tensors and compare fingerprints (raises ``FingerprintError``)."""
    check_shapes(index, ckpt)
    names = sorted(index.entries)
    buffer = ckpt.buffer_for(names)
    for name in names:
        stored = ckpt.read(name, buffer)
        logical = stored.t() if index.entries[name].transposed else stored
        verify_fingerprint(index, name, logical, str(ckpt.root))
        if progress:
            progress(ckpt.tensors[name].raw.nbytes)
