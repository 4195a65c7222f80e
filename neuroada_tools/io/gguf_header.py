"""Structural check of a GGUF file before transformers reads it: magic, version, every length
bounded by the bytes left, and every tensor's data inside the file.

transformers (through the ``gguf`` package) reports a truncated or foreign file as a numpy
reshape or ``struct`` error that names neither the file nor the problem; this reader walks the
header itself (GGUF spec, versions 2 and 3, either byte order) and raises :class:`GGUFError` with
one line naming the file, e.g.
``model.gguf: truncated: tensor 'blk.15.ffn_up.weight' ends at byte 71303168, the file has 49181216 bytes``.

Layout read here (all integers little-endian unless the version field says otherwise)::

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x (key: string, value_type u32, value)        string = u64 length + UTF-8 bytes
    tensor_count x (name: string, n_dims u32, dims u64 x n_dims, ggml_type u32, offset u64)
    padding to general.alignment (default 32) | tensor data (offsets relative to here)

What this leaves out: the values of arrays (skipped, only their lengths are checked) and the
meaning of any key but ``general.architecture``, ``general.name`` and ``general.alignment``. The
tensor byte sizes come from the ``gguf`` package's ``GGML_QUANT_SIZES`` table.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from neuroada_tools.errors import GGUFError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 8  # ggml's GGML_MAX_DIMS is 4; a little room, still a bound
# value type -> struct code of a fixed-size scalar (8 STRING and 9 ARRAY are variable-size)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_KEPT = ("general.architecture", "general.name", "general.alignment")


@dataclass(frozen=True)
class GGUFHeader:
    """What the header says: the facts a converter needs, nothing more."""

    path: Path
    version: int
    architecture: str | None
    name: str | None
    tensor_count: int
    kv_count: int
    file_size: int
    data_start: int


class _Cursor:
    """Reads values from ``buf`` and refuses any read past its end, naming what was being read."""

    def __init__(self, buf, label: str, endian: str) -> None:
        self.buf, self.label, self.endian, self.pos = buf, label, endian, 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise GGUFError(
                f"{self.label}: truncated: {what} needs {n} bytes at offset {self.pos}, "
                f"the file has {len(self.buf)} bytes"
            )

    def unpack(self, code: str, what: str):
        size = struct.calcsize(code)
        self.need(size, what)
        (value,) = struct.unpack_from(self.endian + code, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, what: str) -> str:
        n = self.unpack("Q", f"the length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.label}: {what} at offset {self.pos - n} is not UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0):
        """Read (or skip, for arrays) one value of type ``vtype``; returns scalars and strings."""
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], what)
        if vtype == 8:
            return self.string(what)
        if vtype == 9:
            if depth > 4:
                raise GGUFError(f"{self.label}: {what}: arrays nested more than 4 deep")
            etype = self.unpack("I", f"the element type of {what}")
            count = self.unpack("Q", f"the length of {what}")
            if etype in _SCALARS:
                self.need(count * struct.calcsize(_SCALARS[etype]), f"{what} ({count} elements)")
                self.pos += count * struct.calcsize(_SCALARS[etype])
            elif etype in (8, 9):
                self.need(count * 8, f"{what} ({count} elements)")  # each element takes >= 8 bytes
                for i in range(count):
                    self.value(etype, f"{what}[{i}]", depth + 1)
            else:
                raise GGUFError(f"{self.label}: {what}: unknown array element type {etype}")
            return None
        raise GGUFError(f"{self.label}: {what}: unknown value type {vtype}")


def read_gguf_header(path: Path | str) -> GGUFHeader:
    """Parse and bound-check the header of the GGUF file at ``path``.

    Rejects with :class:`GGUFError`: a missing or unreadable file, a file that does not start with
    ``GGUF``, an unsupported version, any length or count that runs past the end of the file, an
    unknown value or tensor type, a tensor offset that is not aligned, and tensor data that ends
    past the end of the file (a truncated download).

    >>> read_gguf_header("SmolLM2-135M-Instruct.Q4_1.gguf").architecture  # doctest: +SKIP
    'llama'
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    label = path.name
    if not path.exists():
        raise GGUFError(f"{path}: no such file")
    if not path.is_file():
        raise GGUFError(f"{path}: not a file")
    try:
        size = path.stat().st_size
        if size < 24:
            raise GGUFError(f"{label}: not a GGUF file (only {size} bytes; the fixed header alone is 24)")
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(path, label, buf, size, GGML_QUANT_SIZES, GGMLQuantizationType)
    except OSError as e:
        raise GGUFError(f"{label}: cannot read ({e.strerror or e})") from None


def _parse(path: Path, label: str, buf, size: int, quant_sizes, quant_type) -> GGUFHeader:
    if bytes(buf[:4]) != MAGIC:
        raise GGUFError(f"{label}: not a GGUF file (starts with {bytes(buf[:4])!r}, expected {MAGIC!r})")
    (version,) = struct.unpack_from("<I", buf, 4)
    endian = "<"
    if version not in VERSIONS and struct.unpack_from(">I", buf, 4)[0] in VERSIONS:
        endian = ">"  # a big-endian GGUF: the version field reads byte-swapped
        (version,) = struct.unpack_from(">I", buf, 4)
    if version not in VERSIONS:
        raise GGUFError(f"{label}: GGUF version {version} is not supported (expected one of {VERSIONS})")
    cur = _Cursor(buf, label, endian)
    cur.pos = 8
    tensor_count = cur.unpack("Q", "the tensor count")
    kv_count = cur.unpack("Q", "the key-value count")
    # every key-value takes >= 12 bytes and every tensor info >= 24: bound the counts before looping
    cur.need(kv_count * 12 + tensor_count * 24, f"the header ({kv_count} key-values, {tensor_count} tensor infos)")
    kept: dict[str, object] = {}
    for i in range(kv_count):
        key = cur.string(f"key {i}")
        vtype = cur.unpack("I", f"the value type of {key!r}")
        value = cur.value(vtype, f"value of {key!r}")
        if key in _KEPT:
            kept[key] = value
    alignment = kept.get("general.alignment", 32)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{label}: general.alignment {alignment!r} is not a positive power of two")
    spans: list[tuple[int, int, str]] = []
    for i in range(tensor_count):
        name = cur.string(f"the name of tensor {i}")
        n_dims = cur.unpack("I", f"the dimension count of {name!r}")
        if n_dims > MAX_DIMS:
            raise GGUFError(f"{label}: tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
        dims = [cur.unpack("Q", f"the dimensions of {name!r}") for _ in range(n_dims)]
        gtype = cur.unpack("I", f"the type of {name!r}")
        offset = cur.unpack("Q", f"the data offset of {name!r}")
        try:
            block, type_size = quant_sizes[quant_type(gtype)]
        except (ValueError, KeyError):
            raise GGUFError(f"{label}: tensor {name!r} has unknown ggml type {gtype}") from None
        numel = 1
        for d in dims:
            numel *= d
        if numel % block:
            raise GGUFError(f"{label}: tensor {name!r}: {numel} elements is not a multiple of its block size {block}")
        if offset % alignment:
            raise GGUFError(f"{label}: tensor {name!r}: data offset {offset} is not a multiple of {alignment}")
        spans.append((offset, offset + numel // block * type_size, name))
    data_start = -(-cur.pos // alignment) * alignment
    for start, end, name in sorted(spans):
        if data_start + end > size:
            raise GGUFError(
                f"{label}: truncated: tensor {name!r} ends at byte {data_start + end}, the file has {size} bytes"
            )
    arch, name = kept.get("general.architecture"), kept.get("general.name")
    return GGUFHeader(
        path=path, version=version, architecture=arch if isinstance(arch, str) else None,
        name=name if isinstance(name, str) else None, tensor_count=tensor_count, kv_count=kv_count,
        file_size=size, data_start=data_start,
    )
