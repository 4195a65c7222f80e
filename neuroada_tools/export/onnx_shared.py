"""One copy of the weights for several ONNX graphs of one model: a shared external data file.

``torch.onnx.export`` writes every graph with its own weights, so ``merge --to onnx --exporter torch
--with-past`` used to write ``model.onnx`` and ``model_with_past.onnx`` with a full copy each
(2 x 540 MB for SmolLM2-135M). :func:`share_weights` rewrites the graphs so that every initializer
lives once in one ``model.onnx.data`` beside them: tensors are keyed by their bytes (SHA-256), so the
same weight in two graphs -- whatever name the exporter gave it -- is stored once, at one offset,
and each graph's initializer points there (ONNX external data: ``location``, ``offset``, ``length``).
ONNX Runtime opens each graph as before; both read the one file.

Memory: one tensor at a time (read from the graph's own raw data or external file, hashed, written).
Tensors under ``MIN_EXTERNAL_BYTES`` stay inside their graph. Offsets are aligned to 4096 bytes (what
onnx's own external-data writer uses for mmap). Example: graphs A and B both holding ``W`` (1 MiB)
and A holding ``b`` (8 KiB): the data file holds ``W`` at 0 and ``b`` at 1 MiB; A points at both,
B at ``W``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from neuroada_tools.errors import ModelError
from neuroada_tools.io.outputs import atomic_file

DATA_FILE = "model.onnx.data"
MIN_EXTERNAL_BYTES = 1024
ALIGN = 4096


def _tensor_bytes(tensor, folder: Path) -> bytes | None:
    """The raw bytes of an initializer (inline ``raw_data`` or its external file); None for typed fields."""
    from onnx import TensorProto

    if tensor.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in tensor.external_data}
        path = folder / info["location"]
        offset, length = int(info.get("offset", 0)), info.get("length")
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(int(length)) if length is not None else f.read()
        return data
    return tensor.raw_data if tensor.HasField("raw_data") else None


def share_weights(paths: list[Path], data_file: str = DATA_FILE) -> dict:
    """Rewrite the graphs at ``paths`` (one folder) to read their weights from one ``data_file``.

    Returns ``{"tensors": n stored, "references": n pointing, "bytes": data file size}``. The old
    per-graph data files are deleted once every graph has been rewritten.
    """
    import onnx

    paths = [Path(p) for p in paths]
    folder = paths[0].parent
    stored: dict[bytes, tuple[int, int]] = {}
    graphs, old_files = [], set()
    references = 0
    try:
        with atomic_file(folder / data_file) as tmp:
            with open(tmp, "wb") as out:
                for path in paths:
                    model = onnx.load(str(path), load_external_data=False)
                    references += _move_weights(model.graph, folder, out, stored, old_files, data_file)
                    graphs.append((path, model))
                out.flush()
                os.fsync(out.fileno())
            for path, model in graphs:
                with open(path, "wb") as f:
                    f.write(model.SerializeToString())
            for name in old_files - {data_file}:
                (folder / name).unlink(missing_ok=True)
    except OSError as e:
        raise ModelError(f"{folder}: cannot write the shared weights file {data_file}: {e}") from e
    return {"tensors": len(stored), "references": references, "bytes": (folder / data_file).stat().st_size}


def _move_weights(graph, folder: Path, out, stored: dict, old_files: set, data_file: str) -> int:
    """Point every initializer of ``graph`` of ``MIN_EXTERNAL_BYTES`` or more into ``out`` (written once
    per distinct content); returns how many it pointed."""
    from onnx import TensorProto

    references = 0
    for tensor in _initializers(graph):
        if tensor.data_location == TensorProto.EXTERNAL:
            old_files.add({e.key: e.value for e in tensor.external_data}["location"])
        data = _tensor_bytes(tensor, folder)
        if data is None or len(data) < MIN_EXTERNAL_BYTES:
            if data is not None and tensor.data_location == TensorProto.EXTERNAL:
                _inline(tensor, data)
            continue
        key = hashlib.sha256(data).digest()
        if key not in stored:
            out.write(b"\0" * ((-out.tell()) % ALIGN))
            stored[key] = (out.tell(), len(data))
            out.write(data)
        _point(tensor, data_file, *stored[key])
        references += 1
    return references


def _initializers(graph):
    """Every initializer, those of subgraphs (If / Loop bodies) included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _initializers(attr.g)
            for g in attr.graphs:
                yield from _initializers(g)


def _point(tensor, location: str, offset: int, length: int) -> None:
    from onnx import TensorProto

    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = TensorProto.EXTERNAL


def _inline(tensor, data: bytes) -> None:
    from onnx import TensorProto

    del tensor.external_data[:]
    tensor.data_location = TensorProto.DEFAULT
    tensor.raw_data = data
