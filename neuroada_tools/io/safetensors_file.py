"""Hardened, streaming safetensors I/O.

The safetensors format is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(``{"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``),
then the tensor bytes. This module reads headers of untrusted files with every length bounded by
the bytes that exist, reads one tensor at a time (no mmap of a whole shard, no model load), and
writes files tensor by tensor so that a merged 7B model never sits in memory at once.

It does not interpret names or metadata: ``checkpoint.py`` and ``sidecar.py`` do that.
Every failure is raised as the caller's error class (``CheckpointError`` or ``SidecarError``)
with the file name in the message.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from neuroada_tools.errors import CheckpointError, NeuroAdaError
from neuroada_tools.io.jsontext import parse_json

# safetensors dtype string -> (torch dtype, item size in bytes)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
TORCH_TO_ST: dict[torch.dtype, str] = {v[0]: k for k, v in DTYPES.items()}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit


@dataclass(frozen=True)
class RawTensor:
    """Where one tensor lives in a file: dtype string, shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]


@dataclass(frozen=True)
class Header:
    """A validated safetensors header."""

    path: Path
    tensors: dict[str, RawTensor]
    metadata: dict[str, str]
    file_size: int


def short_repr(value: object, limit: int = 120) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages quote untrusted values, which
    may be megabytes long. Example: ``short_repr([1] * 1000, 12) == '[1, 1, 1, 1...'``."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def duplicate_key_hook(message: str = "duplicate key {key!r}"):
    """A ``json.loads`` ``object_pairs_hook`` that raises ``ValueError(message)`` on a repeated key
    (plain ``json`` keeps the last one silently, which would hide a tensor listed twice)."""

    def hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in pairs:
            if key in out:
                raise ValueError(message.format(key=key))
            out[key] = value
        return out

    return hook


_no_duplicates = duplicate_key_hook()


def read_header(path: Path | str, error: type[NeuroAdaError] = CheckpointError) -> Header:
    """Parse and validate the header of the safetensors file at ``path``.

    Rejects (raising ``error`` with the file name): a missing or unreadable file, fewer than 8
    bytes, a header length past the end of the file or over 100 MB, non-UTF-8 or invalid JSON,
    duplicate keys, unknown dtypes, negative or non-integer shapes, byte ranges that do not match
    ``numel * itemsize``, that overlap, leave holes, or run past the end of the file.
    """
    path = Path(path)
    label = path.name
    if not path.exists():
        raise error(f"{path}: no such file")
    if not path.is_file():
        raise error(f"{path}: not a file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise error(f"{label}: not a safetensors file (only {len(head)} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise error(f"{label}: not a safetensors file (header length {n} exceeds 100 MB)")
            if 8 + n > size:
                raise error(
                    f"{label}: truncated or not a safetensors file "
                    f"(header length {n} runs past the end of the {size}-byte file)"
                )
            raw = f.read(n)
    except OSError as e:
        raise error(f"{label}: cannot read ({e.strerror or e})") from None
    doc = parse_json(raw, error, f"{label}: not a safetensors file (header is not valid JSON: {{why}})",
                     f"{label}: not a safetensors file (header JSON nested too deeply)", hook=_no_duplicates)
    if not isinstance(doc, dict):
        raise error(f"{label}: not a safetensors file (header is not a JSON object)")
    data_start = 8 + n
    data_len = size - data_start
    metadata = doc.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise error(f"{label}: __metadata__ must map strings to strings")
    tensors: dict[str, RawTensor] = {}
    for name, info in doc.items():
        tensors[name] = _parse_entry(label, name, info, data_start, data_len, error)
    spans = sorted((t.start, t.end, t.name) for t in tensors.values())
    pos = data_start
    for start, end, name in spans:
        if start < pos:
            raise error(f"{label}: tensor {name!r} overlaps the previous tensor")
        if start > pos:
            raise error(f"{label}: hole of {start - pos} bytes before tensor {name!r}")
        pos = end
    if pos != size:
        raise error(f"{label}: {size - pos} trailing bytes after the last tensor")
    return Header(path=path, tensors=tensors, metadata=dict(metadata), file_size=size)


MAX_SPAN = 2**63 - 1  # strides must fit int64, also for a zero-size tensor such as [0, 2**70]


def _span(shape: list[int]) -> int:
    """The product of ``max(d, 1)`` over ``shape``, stopping once it passes ``MAX_SPAN``.

    Bounded work for hostile shapes (no huge integer products), and a zero dimension does not
    hide a dimension torch cannot represent. Example: ``[0, 2**70]`` -> over ``MAX_SPAN``.
    """
    span = 1
    for d in shape:
        span *= max(d, 1)
        if span > MAX_SPAN:
            return span
    return span


def _parse_entry(
    label: str, name: str, info: object, data_start: int, data_len: int, error: type[NeuroAdaError]
) -> RawTensor:
    if not isinstance(info, dict):
        raise error(f"{label}: tensor {name!r}: entry is not an object")
    dtype = info.get("dtype")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise error(f"{label}: tensor {name!r}: unsupported dtype {short_repr(dtype)}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise error(f"{label}: tensor {name!r}: invalid shape {short_repr(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise error(f"{label}: tensor {name!r}: invalid data_offsets {short_repr(offsets)}")
    if _span(shape) > MAX_SPAN:
        raise error(f"{label}: tensor {name!r}: invalid shape {short_repr(shape)} (too large)")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise error(f"{label}: tensor {name!r}: invalid data_offsets {short_repr(offsets)}")
    if end > data_len:
        raise error(
            f"{label}: truncated: tensor {name!r} ends at byte {end} "
            f"but the file holds only {data_len} data bytes"
        )
    expected = math.prod(shape) * DTYPES[dtype][1]
    if end - begin != expected:
        raise error(
            f"{label}: tensor {name!r}: {end - begin} bytes for shape {short_repr(shape)} {dtype} "
            f"(expected {expected})"
        )
    return RawTensor(name, dtype, tuple(shape), data_start + begin, data_start + end)


def read_tensor(
    path: Path, raw: RawTensor, error: type[NeuroAdaError] = CheckpointError, buffer: torch.Tensor | None = None
) -> torch.Tensor:
    """Read one tensor's bytes (one copy, no mmap) and view them with its dtype and shape.

    With ``buffer`` (a uint8 tensor of at least ``raw.nbytes``), the bytes land there and the
    result is a view of it: streaming loops reuse one buffer instead of faulting in fresh pages
    for every tensor. The view is only valid until the buffer is reused.
    """
    if buffer is not None and buffer.numel() >= raw.nbytes:
        buf = buffer[: raw.nbytes]
    else:
        buf = torch.empty(raw.nbytes, dtype=torch.uint8)
    try:
        with open(path, "rb") as f:
            f.seek(raw.start)
            got = f.readinto(memoryview(buf.numpy()))
    except OSError as e:
        raise error(f"{Path(path).name}: cannot read tensor {raw.name!r} ({e.strerror or e})") from None
    if got != raw.nbytes:
        raise error(f"{Path(path).name}: truncated while reading tensor {raw.name!r}")
    if raw.nbytes == 0:
        return torch.empty(raw.shape, dtype=raw.torch_dtype)
    return buf.view(raw.torch_dtype).reshape(raw.shape)


def read_all(path: Path, header: Header, error: type[NeuroAdaError]) -> dict[str, torch.Tensor]:
    """Read every tensor of a small file (sidecars), in header order."""
    return {name: read_tensor(path, raw, error) for name, raw in header.tensors.items()}


class StreamingWriter:
    """Write a safetensors file one tensor at a time, in a fixed declared order.

    The header (names, dtypes, shapes, offsets, metadata) is written first, so the writer needs
    the full list of entries up front but never more than one tensor's bytes in memory.
    The header JSON is written with ``__metadata__`` first and entries in the declared order,
    padded with spaces to a multiple of 8 bytes, so equal inputs give byte-identical files.
    """

    def __init__(
        self,
        path: Path,
        entries: list[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        self._expected: list[tuple[str, str, tuple[int, ...], int]] = []
        for name, dtype, shape in entries:
            nbytes = math.prod(shape) * DTYPES[dtype][1]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._expected.append((name, dtype, tuple(shape), nbytes))
            offset += nbytes
        self._header = header
        blob = self._header_blob()
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(blob)))
        self._f.write(blob)
        self._header_len = len(blob)
        self._next = 0

    def _header_blob(self) -> bytes:
        blob = json.dumps(self._header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        return blob + b" " * (-len(blob) % 8)

    def replace_metadata(self, metadata: dict[str, str]) -> None:
        """Rewrite the header's metadata in place (before ``close``): values only known once the
        tensors are written, such as fingerprints. The new header must encode to the same length
        (callers reserve fixed-width placeholders), so no tensor byte moves."""
        self._header["__metadata__"] = dict(metadata)
        blob = self._header_blob()
        if len(blob) != self._header_len:
            raise ValueError(f"{self.path.name}: new metadata changes the header size ({len(blob)} != "
                f"{self._header_len})")
        end = self._f.tell()
        try:
            self._f.seek(8)
            self._f.write(blob)
            self._f.seek(end)
        except OSError as e:
            raise _named(e, self.path) from None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next declared tensor; its name, dtype and shape must match the declaration."""
        exp_name, exp_dtype, exp_shape, nbytes = self._expected[self._next]
        if name != exp_name or TORCH_TO_ST.get(tensor.dtype) != exp_dtype or tuple(tensor.shape) != exp_shape:
            raise ValueError(
                f"writer expected {exp_name} {exp_dtype} {exp_shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}"
            )
        t = tensor.detach().contiguous().cpu()
        if nbytes:
            try:
                self._f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
            except OSError as e:  # disk full: say which file (the bare error has no name)
                raise _named(e, self.path) from None
        self._next += 1

    def close(self) -> None:
        """Flush and fsync; raise if some declared tensor was never written."""
        try:
            if self._next != len(self._expected):
                raise ValueError(f"{self.path.name}: {len(self._expected) - self._next} tensors not written")
            try:
                self._f.flush()
                os.fsync(self._f.fileno())
            except OSError as e:
                raise _named(e, self.path) from None
        finally:
            try:
                self._f.close()
            except OSError:
                pass  # the flush above already failed and said why

    def abort(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass  # unflushed bytes of a file that is being thrown away


def _named(e: OSError, path: Path) -> OSError:
    """``e`` with ``path`` as its file name, so the CLI's one-line error says where."""
    return e if e.filename else OSError(e.errno, e.strerror or str(e), str(path))


def write_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write small tensors (sidecars) in the dict's order."""
    entries = [(n, TORCH_TO_ST[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    w = StreamingWriter(path, entries, metadata)
    try:
        for n, t in tensors.items():
            w.write(n, t)
        w.close()
    except BaseException:
        w.abort()
        raise
