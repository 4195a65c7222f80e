"""Open a base checkpoint without loading it: a single ``.safetensors`` file, a sharded
checkpoint's ``model.safetensors.index.json``, or a model folder holding either.

``open_checkpoint`` validates every header (bounded by the bytes on disk) and the shard map, and
returns a ``Checkpoint`` that lists tensors and reads exactly one of them at a time. It never
unpickles anything (``pytorch_model.bin`` is not read) and never reads a whole shard.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from neuroada_tools.errors import CheckpointError
from neuroada_tools.io.jsontext import parse_json
from neuroada_tools.io.safetensors_file import Header, RawTensor, duplicate_key_hook, read_header, read_tensor

INDEX_JSON = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_INDEX_JSON_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class TensorRef:
    """One tensor of the checkpoint: its file and byte range."""

    file: Path
    raw: RawTensor

    @property
    def shape(self) -> tuple[int, ...]:
        return self.raw.shape

    @property
    def dtype(self) -> str:
        return self.raw.dtype


@dataclass
class Checkpoint:
    """A validated checkpoint. ``tensors`` is sorted by name; ``config`` is config.json or None."""

    root: Path
    files: list[Path]
    tensors: dict[str, TensorRef]
    config: dict | None
    headers: dict[Path, Header]

    def read(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor in its stored dtype and shape (into ``buffer`` if given, see read_tensor)."""
        ref = self.tensors[name]
        return read_tensor(ref.file, ref.raw, buffer=buffer)

    def buffer_for(self, names: list[str]) -> torch.Tensor:
        """A uint8 buffer large enough for the largest of ``names``, to reuse across reads."""
        return torch.empty(max((self.tensors[n].raw.nbytes for n in names), default=0), dtype=torch.uint8)

    def iter_tensors(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            yield name, self.read(name)

    @property
    def total_bytes(self) -> int:
        return sum(r.raw.nbytes for r in self.tensors.values())

    @property
    def total_parameters(self) -> int:
        return sum(r.raw.numel for r in self.tensors.values())


def resolve_input(path: Path | str) -> tuple[Path, Path]:
    """Return ``(root folder, entry file)`` for a file, a sharded index or a model folder."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    if p.is_dir():
        for name in (INDEX_JSON, SINGLE):
            if (p / name).is_file():
                return p, p / name
        found = sorted(
            f for f in p.glob("*.safetensors") if not f.name.endswith((".index.safetensors", ".delta.safetensors"))
        )
        if len(found) == 1:
            return p, found[0]
        if not found:
            raise CheckpointError(f"{p}: no {SINGLE}, {INDEX_JSON} or other .safetensors file in the folder")
        raise CheckpointError(
            f"{p}: several .safetensors files and no {INDEX_JSON}; pass the file to use"
        )
    return p.parent, p


def open_checkpoint(path: Path | str) -> Checkpoint:
    """Open and validate a checkpoint; see the module docstring for accepted forms."""
    root, entry = resolve_input(path)
    if entry.name.endswith(".json"):
        shard_of = _read_shard_map(entry)
        files = sorted(set(shard_of.values()))
    else:
        shard_of = None
        files = [entry]
    headers = {f: read_header(f, CheckpointError) for f in files}
    tensors: dict[str, TensorRef] = {}
    if shard_of is None:
        h = headers[entry]
        for name, raw in h.tensors.items():
            tensors[name] = TensorRef(entry, raw)
    else:
        for name, f in shard_of.items():
            raw = headers[f].tensors.get(name)
            if raw is None:
                raise CheckpointError(f"{entry.name}: tensor {name!r} is mapped to {f.name}, which does not hold it")
            tensors[name] = TensorRef(f, raw)
    tensors = dict(sorted(tensors.items()))
    return Checkpoint(root=root, files=files, tensors=tensors, config=_read_config(root), headers=headers)


def _read_shard_map(index_path: Path) -> dict[str, Path]:
    label = index_path.name
    try:
        if index_path.stat().st_size > MAX_INDEX_JSON_BYTES:
            raise CheckpointError(f"{label}: larger than 64 MB, not a shard index")
        text = index_path.read_bytes().decode("utf-8")
    except OSError as e:
        raise CheckpointError(f"{label}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{label}: invalid JSON ({e})") from None

    doc = parse_json(
        text,
        CheckpointError,
        f"{label}: invalid JSON ({{why}})",
        f"{label}: invalid JSON (nested too deeply)",
        hook=duplicate_key_hook("tensor {key!r} listed twice"),
    )
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{label}: no weight_map")
    root = index_path.parent
    out: dict[str, Path] = {}
    checked: dict[str, Path] = {}
    for name, shard in wm.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(f"{label}: tensor {name!r}: shard must be a file name")
        if shard not in checked:
            pp = PurePosixPath(shard)
            if pp.is_absolute() or "\\" in shard or ".." in pp.parts or shard.startswith("~"):
                raise CheckpointError(f"{label}: shard path {shard!r} lies outside the model folder")
            f = root / pp
            try:
                present = f.is_file()
            except OSError:  # e.g. a name too long for the file system
                present = False
            if not present:
                raise CheckpointError(f"{label}: shard {shard!r} is missing")
            checked[shard] = f
        out[name] = checked[shard]
    return out


def _read_config(root: Path) -> dict | None:
    cfg = root / "config.json"
    if not cfg.is_file():
        return None
    try:
        raw = cfg.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{cfg}: cannot read ({e.strerror or e})") from None
    doc = parse_json(raw, CheckpointError, f"{cfg}: invalid JSON ({{why}})", f"{cfg}: invalid JSON (nested too deeply)")
    if not isinstance(doc, dict):
        raise CheckpointError(f"{cfg}: not a JSON object")
    return doc
