"""The only module that knows the sidecar formats (formats/index-v1.md, formats/delta-v1.md).

An index sidecar holds, per adapted base tensor, the int32 ``[d_out, k]`` columns each output
neuron trains, plus the base's fingerprints. A delta sidecar holds the fp32 ``[d_out, k]`` trained
values under the same names, dense task-head tensors under ``dense.``, and the SHA-256 of the index
file it was trained against. Both are safetensors files; ``read_index``/``read_delta`` enforce every
MUST of the specs and raise ``SidecarError`` naming the file and tensor.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from neuroada_tools import __version__
from neuroada_tools.errors import FingerprintError, SidecarError
from neuroada_tools.hf import TASKS
from neuroada_tools.index.criteria import CRITERIA
from neuroada_tools.io.jsontext import parse_json
from neuroada_tools.io.safetensors_file import StreamingWriter, read_all, read_header, short_repr, write_file

INDEX_MAGIC = "neuroada-index"
DELTA_MAGIC = "neuroada-delta"
FORMAT_VERSION = 1
DENSE_PREFIX = "dense."
LAYOUTS = ("out_in", "in_out")
FINGERPRINT_ROWS = 16
_HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_D_IN = 2**31 - 1  # I4: column indices are int32 (and torch compares them to d_in in int32)
MAX_D_OUT = 2**63 - 1
#: ``neuroada.calibration`` (criterion ``gradient``): its keys and the check each value passes
CALIBRATION_KEYS = ("batch_size", "data_sha256", "examples", "max_length", "task")


@dataclass(frozen=True)
class TensorEntry:
    """Per-tensor facts an index records about the base weight it was made from."""

    shape: tuple[int, int]  # logical (d_out, d_in)
    layout: str  # "out_in" (nn.Linear) or "in_out" (GPT-2 Conv1D stores the weight transposed)
    dtype: str  # base dtype, safetensors spelling ("BF16", "F32", ...)
    fingerprint: str  # see fingerprint()

    @property
    def transposed(self) -> bool:
        return self.layout == "in_out"


@dataclass
class IndexSidecar:
    """An index: ``indices[name]`` is int32 ``[d_out, k_t]``, rows strictly ascending."""

    k: int
    criterion: str
    indices: dict[str, torch.Tensor]
    entries: dict[str, TensorEntry]
    seed: int | None = None
    model_type: str = ""
    #: criterion ``gradient`` only: how the scores were computed (``CALIBRATION_KEYS``), else None
    calibration: dict | None = None
    digest: str = ""  # SHA-256 of the file bytes; set by read_index / write_index
    #: names whose index rows passed ``check_rows`` (read_index fills it): rows are validated once
    checked: set[str] = field(default_factory=set, repr=False, compare=False)

    def trainable_parameters(self) -> int:
        return sum(int(t.numel()) for t in self.indices.values())

    def check_rows(self, label: str = "index") -> None:
        """Validate the rows not validated yet: integer ``[d_out, 1..min(k, d_in)]``, every index in
        ``0..d_in-1``, strictly ascending. The compiled kernels rely on this (an index out of range
        would read outside the weight), and ``read_index`` has already done it for a file."""
        for name in sorted(set(self.indices) - self.checked):
            entry = self.entries.get(name)
            if entry is None:
                raise SidecarError(f"{label}: tensor {name!r} has no entry in neuroada.tensors")
            _check_rows(label, name, self.indices[name], entry, self.k)
            self.checked.add(name)


@dataclass
class DeltaSidecar:
    """A delta: ``deltas[name]`` fp32 ``[d_out, k_t]``; ``dense[name]`` dense task-model tensors."""

    index_digest: str
    deltas: dict[str, torch.Tensor]
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    task: str = ""
    info: dict = field(default_factory=dict)  # free-form provenance (training settings, labels)
    digest: str = ""


def fingerprint(weight: torch.Tensor, indices: torch.Tensor) -> str:
    """SHA-256 binding a sidecar to the base weight's values, independent of storage dtype.

    ``weight`` is the logical ``[d_out, d_in]`` weight (any float dtype, any strides), ``indices``
    the index rows. Hashed, in order: ``b"neuroada-fp1\\0"``; ``d_out, d_in`` as little-endian
    int64; the fp32 bytes of ``FINGERPRINT_ROWS`` evenly spaced rows ``r_i = i * d_out // 16``;
    the fp32 bytes of the selected values ``W[i, idx[i, j]]`` row by row. The sampled rows catch a
    different base of the same shape (fine-tuning moves every weight); the selected values catch
    a base that was already merged with a delta (which changes exactly those). fp32 bytes make a
    bf16 base and its exact fp32 upcast share fingerprints.

    Example: for ``W = [[1., 2.], [3., 4.]]`` and ``idx = [[1], [0]]`` the hash covers rows 0 and
    1 (d_out < 16 takes each row once) then the values ``[2., 3.]``.
    """
    d_out, d_in = weight.shape
    h = hashlib.sha256(b"neuroada-fp1\0")
    h.update(struct.pack("<qq", d_out, d_in))
    rows = sorted({i * d_out // FINGERPRINT_ROWS for i in range(FINGERPRINT_ROWS)}) if d_out else []
    # sampled and gathered where the weight lies (a GPU weight is not copied whole to the host)
    sample = weight[rows].to(torch.float32).contiguous()
    h.update(sample.cpu().numpy().tobytes())
    picked = torch.gather(weight, 1, indices.to(device=weight.device, dtype=torch.int64)).to(torch.float32)
    h.update(picked.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- writing


def index_metadata(index: IndexSidecar) -> dict[str, str]:
    """The ``__metadata__`` of an index sidecar (formats/index-v1.md); ``index.indices`` unused.

    ``neuroada.calibration`` is written only for an index that has one (criterion ``gradient``), so
    the other criteria give the same bytes as before the key existed."""
    meta = {
        "neuroada.magic": INDEX_MAGIC,
        "neuroada.version": str(FORMAT_VERSION),
        "neuroada.k": str(index.k),
        "neuroada.criterion": index.criterion,
        "neuroada.seed": "" if index.seed is None else str(index.seed),
        "neuroada.model_type": index.model_type,
        "neuroada.tensors": json.dumps(
            {
                n: {
                    "shape": list(e.shape),
                    "layout": e.layout,
                    "dtype": e.dtype,
                    "fingerprint": e.fingerprint,
                }
                for n, e in sorted(index.entries.items())
            },
            separators=(",", ":"),
        ),
        "neuroada.writer": f"neuroada-tools {__version__}",
    }
    if index.calibration is not None:
        meta["neuroada.calibration"] = json.dumps(index.calibration, sort_keys=True, separators=(",", ":"))
    return meta


def write_index(path: Path, index: IndexSidecar) -> str:
    """Write ``index`` to ``path`` (caller handles atomic rename); return and record its digest."""
    names = sorted(index.indices)
    write_file(path, {n: index.indices[n].to(torch.int32).contiguous() for n in names}, index_metadata(index))
    index.digest = file_digest(path)
    return index.digest


class IndexStreamWriter:
    """Write an index sidecar one tensor at a time, byte-identical to ``write_index``.

    ``index`` carries everything but the indices and fingerprints: its ``entries`` (sorted names,
    shapes, layouts, dtypes) and ``ks`` fix the header up front; the fingerprints, 64 hex digits
    each, are written as placeholders of the same width and filled in by ``close``. Memory: one
    tensor's indices at a time, instead of the whole index (108 MB for LLaMA-7B at k=20).
    """

    def __init__(self, path: Path, index: IndexSidecar, ks: dict[str, int]) -> None:
        self.index = index
        self.names = sorted(index.entries)
        for n in self.names:
            index.entries[n] = replace(index.entries[n], fingerprint="0" * 64)
        entries = [(n, "I32", (index.entries[n].shape[0], ks[n])) for n in self.names]
        self._w = StreamingWriter(path, entries, index_metadata(index))
        self.path = Path(path)

    def write(self, name: str, indices: torch.Tensor, fingerprint_hex: str) -> None:
        """Write the next tensor (in sorted-name order) and record its fingerprint."""
        self.index.entries[name] = replace(self.index.entries[name], fingerprint=fingerprint_hex)
        self._w.write(name, indices.to(torch.int32).contiguous())

    def close(self) -> str:
        """Fill in the fingerprints, fsync, and return the file's SHA-256."""
        try:
            self._w.replace_metadata(index_metadata(self.index))
            self._w.close()
        except BaseException:
            self._w.abort()
            raise
        self.index.digest = file_digest(self.path)
        return self.index.digest

    def abort(self) -> None:
        self._w.abort()


def write_delta(path: Path, delta: DeltaSidecar) -> str:
    """Write ``delta`` to ``path``; deltas and dense tensors are stored fp32."""
    tensors = {n: delta.deltas[n].detach().to(torch.float32).contiguous() for n in sorted(delta.deltas)}
    for n in sorted(delta.dense):
        tensors[DENSE_PREFIX + n] = delta.dense[n].detach().to(torch.float32).contiguous()
    meta = {
        "neuroada.magic": DELTA_MAGIC,
        "neuroada.version": str(FORMAT_VERSION),
        "neuroada.index_sha256": delta.index_digest,
        "neuroada.task": delta.task,
        "neuroada.info": json.dumps(delta.info, sort_keys=True, separators=(",", ":")),
        "neuroada.writer": f"neuroada-tools {__version__}",
    }
    write_file(path, tensors, meta)
    delta.digest = file_digest(path)
    return delta.digest


# ---------------------------------------------------------------- reading


def _common(path: Path, magic: str) -> tuple[dict[str, str], dict[str, torch.Tensor], str]:
    header = read_header(path, SidecarError)
    label = Path(path).name
    meta = header.metadata
    found = meta.get("neuroada.magic")
    if found != magic:
        other = {INDEX_MAGIC: "an index", DELTA_MAGIC: "a delta"}.get(found or "")
        what = f"it is {other} sidecar" if other else f"magic is {short_repr(found)}"
        raise SidecarError(f"{label}: not {'an index' if magic == INDEX_MAGIC else 'a delta'} sidecar ({what})")
    version = meta.get("neuroada.version")
    if version != str(FORMAT_VERSION):
        raise SidecarError(f"{label}: unsupported format version {short_repr(version)} (this tool reads "
            f"{FORMAT_VERSION})")
    return meta, read_all(path, header, SidecarError), file_digest(path)


def read_index(path: Path | str) -> IndexSidecar:
    """Read and validate an index sidecar (every MUST of formats/index-v1.md)."""
    path = Path(path)
    label = path.name
    meta, tensors, digest = _common(path, INDEX_MAGIC)
    k = _int_field(label, meta, "neuroada.k", minimum=1)
    criterion = meta.get("neuroada.criterion")
    if criterion not in CRITERIA:
        raise SidecarError(f"{label}: neuroada.criterion {short_repr(criterion)} not one of {', '.join(CRITERIA)}")
    seed_s = meta.get("neuroada.seed", "")
    seed = None
    if seed_s:
        seed = _int_field(label, meta, "neuroada.seed", minimum=0)
    elif criterion == "random":
        raise SidecarError(f"{label}: criterion 'random' requires neuroada.seed")
    calibration = _parse_calibration(label, meta.get("neuroada.calibration"), criterion)
    entries = _parse_entries(label, meta.get("neuroada.tensors"))
    if not tensors:
        raise SidecarError(f"{label}: holds no tensors")
    for name in tensors:
        if name not in entries:
            raise SidecarError(f"{label}: tensor {name!r} has no entry in neuroada.tensors")
    for name in entries:
        if name not in tensors:
            raise SidecarError(f"{label}: neuroada.tensors lists {name!r} but the file has no such tensor")
    for name, t in tensors.items():
        if t.dtype != torch.int32:
            raise SidecarError(f"{label}: {name!r}: dtype must be I32, found {str(t.dtype).removeprefix('torch.')}")
        _check_rows(label, name, t, entries[name], k)
    return IndexSidecar(
        k=k,
        criterion=criterion,
        indices=tensors,
        entries=entries,
        seed=seed,
        model_type=meta.get("neuroada.model_type", ""),
        calibration=calibration,
        digest=digest,
        checked=set(tensors),
    )


def _int_field(label: str, meta: dict[str, str], key: str, minimum: int) -> int:
    raw = meta.get(key)
    if raw is None or not re.fullmatch(r"[0-9]{1,12}", raw) or int(raw) < minimum:
        raise SidecarError(f"{label}: {key} must be an integer >= {minimum}, found {short_repr(raw)}")
    return int(raw)


def _parse_calibration(label: str, raw: str | None, criterion: str) -> dict | None:
    """I10: ``neuroada.calibration`` is present exactly when the criterion is ``gradient``, and is a
    JSON object with the keys ``CALIBRATION_KEYS`` and no others (counts are integers >= 1)."""
    if criterion != "gradient":
        if raw is not None:
            raise SidecarError(f"{label}: neuroada.calibration is only for criterion 'gradient', found {criterion!r}")
        return None
    if raw is None:
        raise SidecarError(f"{label}: criterion 'gradient' requires neuroada.calibration")
    doc = parse_json(
        raw,
        SidecarError,
        f"{label}: neuroada.calibration is not valid JSON ({{why}})",
        f"{label}: neuroada.calibration is nested too deeply",
    )
    if not isinstance(doc, dict) or sorted(doc) != list(CALIBRATION_KEYS):
        found = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise SidecarError(
            f"{label}: neuroada.calibration must be an object with keys {', '.join(CALIBRATION_KEYS)}, "
            f"found {short_repr(found)}"
        )
    for key in ("batch_size", "examples", "max_length"):
        v = doc[key]
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v < 10**12:
            raise SidecarError(f"{label}: neuroada.calibration {key} must be an integer >= 1, found {short_repr(v)}")
    if not isinstance(doc["data_sha256"], str) or not _HEX64.fullmatch(doc["data_sha256"]):
        raise SidecarError(f"{label}: neuroada.calibration data_sha256 must be 64 lowercase hex digits")
    if doc["task"] not in TASKS:
        raise SidecarError(
            f"{label}: neuroada.calibration task {short_repr(doc['task'])} not one of {', '.join(TASKS)}"
        )
    return doc


def _parse_entries(label: str, raw: str | None) -> dict[str, TensorEntry]:
    if raw is None:
        raise SidecarError(f"{label}: missing neuroada.tensors metadata")
    doc = parse_json(
        raw,
        SidecarError,
        f"{label}: neuroada.tensors is not valid JSON ({{why}})",
        f"{label}: neuroada.tensors is nested too deeply",
    )
    if not isinstance(doc, dict):
        raise SidecarError(f"{label}: neuroada.tensors must be a JSON object")
    out: dict[str, TensorEntry] = {}
    for name, e in doc.items():
        where = f"{label}: neuroada.tensors[{name!r}]"
        if not isinstance(e, dict):
            raise SidecarError(f"{where}: not an object")
        shape = e.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) != 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
            or shape[0] > MAX_D_OUT
            or shape[1] > MAX_D_IN
        ):
            raise SidecarError(f"{where}: shape must be [d_out, d_in] of positive integers, found {short_repr(shape)}")
        layout = e.get("layout")
        if layout not in LAYOUTS:
            raise SidecarError(f"{where}: layout must be 'out_in' or 'in_out', found {short_repr(layout)}")
        dtype = e.get("dtype")
        if dtype not in ("F64", "F32", "F16", "BF16"):
            raise SidecarError(f"{where}: dtype must be a float dtype, found {short_repr(dtype)}")
        fp = e.get("fingerprint")
        if not isinstance(fp, str) or not _HEX64.fullmatch(fp):
            raise SidecarError(f"{where}: fingerprint must be 64 lowercase hex digits")
        out[name] = TensorEntry((shape[0], shape[1]), layout, dtype, fp)
    return out


def _check_rows(label: str, name: str, t: torch.Tensor, entry: TensorEntry, k: int) -> None:
    where = f"{label}: {name!r}"
    if t.dtype not in (torch.int32, torch.int64):
        raise SidecarError(f"{where}: indices must be integers, found {str(t.dtype).removeprefix('torch.')}")
    d_out, d_in = entry.shape
    if t.dim() != 2 or t.shape[0] != d_out:
        raise SidecarError(f"{where}: shape {list(t.shape)} does not match [d_out={d_out}, k]")
    kt = t.shape[1]
    if not 1 <= kt <= min(k, d_in):
        raise SidecarError(f"{where}: {kt} columns per row, expected 1..min(k={k}, d_in={d_in})")
    bad = (t < 0) | (t >= d_in)
    if bool(bad.any()):
        r, c = (int(v) for v in bad.nonzero()[0])
        raise SidecarError(f"{where} row {r}: index {int(t[r, c])} outside 0..{d_in - 1}")
    if kt > 1:
        step = t[:, 1:] <= t[:, :-1]
        if bool(step.any()):
            r, c = (int(v) for v in step.nonzero()[0])
            raise SidecarError(f"{where} row {r}: indices not increasing ({int(t[r, c])} >= {int(t[r, c + 1])})")


def read_delta(path: Path | str, index: IndexSidecar | None = None) -> DeltaSidecar:
    """Read and validate a delta sidecar; with ``index``, also check it belongs to that index."""
    path = Path(path)
    label = path.name
    meta, tensors, digest = _common(path, DELTA_MAGIC)
    index_digest = meta.get("neuroada.index_sha256", "")
    if not _HEX64.fullmatch(index_digest):
        raise SidecarError(f"{label}: neuroada.index_sha256 must be 64 lowercase hex digits")
    info = parse_json(
        meta.get("neuroada.info", "{}") or "{}",
        SidecarError,
        f"{label}: neuroada.info is not valid JSON ({{why}})",
        f"{label}: neuroada.info is nested too deeply",
    )
    if not isinstance(info, dict):
        raise SidecarError(f"{label}: neuroada.info must be a JSON object")
    deltas: dict[str, torch.Tensor] = {}
    dense: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if t.dtype != torch.float32:
            raise SidecarError(f"{label}: {name!r}: dtype must be F32, found {str(t.dtype).removeprefix('torch.')}")
        if not bool(torch.isfinite(t).all()):
            raise SidecarError(f"{label}: {name!r}: contains NaN or Inf")
        if name.startswith(DENSE_PREFIX):
            if len(name) == len(DENSE_PREFIX):
                raise SidecarError(f"{label}: empty dense tensor name")
            dense[name[len(DENSE_PREFIX) :]] = t
        else:
            if t.dim() != 2:
                raise SidecarError(f"{label}: {name!r}: delta must be 2-D [d_out, k], found shape {list(t.shape)}")
            deltas[name] = t
    delta = DeltaSidecar(
        index_digest=index_digest,
        deltas=deltas,
        dense=dense,
        task=meta.get("neuroada.task", ""),
        info=info,
        digest=digest,
    )
    if index is not None:
        check_delta_matches(delta, index, label)
    return delta


def check_delta_matches(delta: DeltaSidecar, index: IndexSidecar, label: str = "delta") -> None:
    """Refuse a delta trained against another index, or whose tensors don't fit this index."""
    if index.digest and delta.index_digest != index.digest:
        raise SidecarError(
            f"{label}: made for index sha256 {delta.index_digest[:12]}..., "
            f"but the given index is {index.digest[:12]}..."
        )
    for name in sorted(index.indices):
        if name not in delta.deltas:
            raise SidecarError(f"{label}: no delta for index tensor {name!r}")
        want = tuple(index.indices[name].shape)
        got = tuple(delta.deltas[name].shape)
        if got != want:
            raise SidecarError(f"{label}: {name!r}: shape {list(got)} does not match the index {list(want)}")
    for name in sorted(delta.deltas):
        if name not in index.indices:
            raise SidecarError(f"{label}: delta tensor {name!r} is not in the index")


def verify_fingerprint(index: IndexSidecar, name: str, logical_weight: torch.Tensor, where: str) -> None:
    """Raise ``FingerprintError`` unless ``logical_weight`` is the base ``name`` was indexed from."""
    entry = index.entries[name]
    if tuple(logical_weight.shape) != entry.shape:
        raise FingerprintError(
            f"{where}: {name!r} has shape {list(logical_weight.shape)}, the index was made for {list(entry.shape)}"
        )
    if fingerprint(logical_weight, index.indices[name]) != entry.fingerprint:
        raise FingerprintError(
            f"{where}: {name!r} differs from the base the index was made from (fingerprint mismatch)"
        )
