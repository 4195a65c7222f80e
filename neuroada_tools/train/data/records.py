"""Read data files into records that remember their file and line (JSON list or JSONL)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from neuroada_tools.errors import DataError

if TYPE_CHECKING:  # pragma: no cover - typing only; importing transformers is slow
    pass

DEFAULT_MAX_RECORD_BYTES = 1 << 20
"""Largest JSONL line or JSON-list record accepted, in bytes (1 MiB)."""

DEFAULT_MAX_FILE_BYTES = 2 << 30
"""Largest JSON-list file accepted, in bytes (2 GiB); a JSON list is parsed whole, JSONL is not."""
_JSON_WS = re.compile(r"[ \t\n\r]*")
_BOM = b"\xef\xbb\xbf"


# --------------------------------------------------------------------------------------------
# Records and where they came from
# --------------------------------------------------------------------------------------------


class RecordList(list):  # type: ignore[type-arg]
    """A list of record dicts that remembers the file and the location of each record.

    ``locations[i]`` is ``"line 7"`` (JSONL) or ``"record 3 (line 12)"`` (JSON list). A plain
    ``list`` works wherever a ``RecordList`` does; its records are then named ``record N``.
    Slicing keeps the locations.
    """

    def __init__(
        self,
        records: Iterable[dict[str, Any]] = (),
        *,
        path: str | os.PathLike[str] | None = None,
        locations: Sequence[str] | None = None,
    ) -> None:
        super().__init__(records)
        self.path = path
        self.locations = (
            list(locations)
            if locations is not None
            else [f"record {i + 1}" for i in range(len(self))]
        )

    def __getitem__(self, key):  # type: ignore[no-untyped-def]
        if isinstance(key, slice):
            return RecordList(
                list.__getitem__(self, key), path=self.path, locations=self.locations[key]
            )
        return list.__getitem__(self, key)


class _Locator:
    """Builds the ``"<file> line 7"`` prefix of error messages for record ``i``."""

    def __init__(
        self, records: Sequence[Mapping[str, Any]], path: str | os.PathLike[str] | None
    ) -> None:
        if path is None and isinstance(records, RecordList):
            path = records.path
        self.name = str(path) if path is not None else None
        self.locations = records.locations if isinstance(records, RecordList) else None

    def at(self, i: int) -> str:
        if self.locations is not None and i < len(self.locations):
            where = self.locations[i]
        else:
            where = f"record {i + 1}"
        return f"{self.name} {where}" if self.name else where

    def file(self) -> str:
        return self.name if self.name else "data"


def _json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def read_records(
    path: str | os.PathLike[str],
    *,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> RecordList:
    """Read a JSON-list or JSONL file into a :class:`RecordList` of dicts.

    JSONL is read line by line with ``readline(max_record_bytes + 2)``, so an over-long line is
    refused after reading at most ``max_record_bytes + 2`` bytes of it (the limit excludes the
    line's ``\\n`` or ``\\r\\n``). A JSON list is parsed whole, so its file size is bounded by
    ``max_file_bytes`` first; each of its records is then bounded by ``max_record_bytes``. A UTF-8
    byte-order mark is skipped.

    Raises :class:`DataError` naming the file and the line, e.g.
    ``train.jsonl line 7: invalid JSON (Expecting ',' delimiter at column 12)`` or
    ``train.json record 3 (line 12): expected a JSON object, found list``, and
    ``train.jsonl: no records`` for a file without any.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            first = _first_significant_byte(f)
            f.seek(0)
            if first == b"[":
                records, locations = _read_json_list(f, path, max_record_bytes, max_file_bytes)
            else:
                records, locations = _read_jsonl(f, path, max_record_bytes)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
    if not records:
        raise DataError(f"{path}: no records")
    return RecordList(records, path=path, locations=locations)


def _first_significant_byte(f: IO[bytes], chunk: int = 1 << 16) -> bytes:
    """The first byte that is not JSON whitespace (after an optional BOM), or ``b""``."""
    start = True
    while True:
        block = f.read(chunk)
        if not block:
            return b""
        if start and block.startswith(_BOM):
            block = block[len(_BOM) :]
        start = False
        stripped = block.lstrip(b" \t\r\n")
        if stripped:
            return stripped[:1]


def _read_jsonl(
    f: IO[bytes], path: Path, max_record_bytes: int
) -> tuple[list[dict[str, Any]], list[str]]:
    records: list[dict[str, Any]] = []
    locations: list[str] = []
    lineno = 0
    while True:
        raw = f.readline(max_record_bytes + 2)  # the line, its \r\n, and no more
        if not raw:
            break
        lineno += 1
        body = raw[:-1] if raw.endswith(b"\n") else raw
        if body.endswith(b"\r") and raw.endswith(b"\n"):
            body = body[:-1]
        if len(body) > max_record_bytes:
            raise DataError(
                f"{path} line {lineno}: line is longer than the limit of {max_record_bytes} bytes"
            )
        if lineno == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path} line {lineno}: not valid UTF-8 (byte {e.start + 1} of the line)"
            ) from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as e:
            hint = ""
            stripped = line.strip()
            if not records and stripped.startswith("{") and not stripped.endswith("}"):
                hint = "; a JSON file must hold a list of objects, JSONL one object per line"
            raise DataError(
                f"{path} line {lineno}: invalid JSON ({e.msg} at column {e.colno}){hint}"
            ) from None
        except RecursionError:
            raise DataError(f"{path} line {lineno}: JSON nested too deeply") from None
        except ValueError as e:  # not a syntax error: e.g. an integer over Python's digit limit
            raise DataError(f"{path} line {lineno}: invalid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise DataError(
                f"{path} line {lineno}: expected a JSON object, found {_json_type(obj)}"
            )
        records.append(obj)
        locations.append(f"line {lineno}")
    return records, locations


def _read_json_list(
    f: IO[bytes], path: Path, max_record_bytes: int, max_file_bytes: int
) -> tuple[list[dict[str, Any]], list[str]]:
    size = os.fstat(f.fileno()).st_size
    if size > max_file_bytes:
        raise DataError(
            f"{path}: file is {size} bytes, over the limit of {max_file_bytes} bytes for a "
            "JSON list (use JSONL, one object per line, for larger data)"
        )
    raw = f.read(size + 1)  # read(n) reserves n bytes up front: ask for what the file holds
    if len(raw) > size:  # the file grew after fstat
        raise DataError(f"{path}: file changed while being read")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path} line {line}: not valid UTF-8 (byte {e.start + 1} of the file)"
        ) from None
    del raw

    def line_col(pos: int) -> tuple[int, int]:
        return text.count("\n", 0, pos) + 1, pos - text.rfind("\n", 0, pos)

    def fail(pos: int, msg: str) -> DataError:
        line, col = line_col(pos)
        return DataError(f"{path} line {line}: invalid JSON ({msg} at column {col})")

    decoder = json.JSONDecoder()
    records: list[dict[str, Any]] = []
    locations: list[str] = []
    last_pos, last_line = 0, 1
    pos = _JSON_WS.match(text, 0).end() + 1  # type: ignore[union-attr]  # after '['
    pos = _JSON_WS.match(text, pos).end()  # type: ignore[union-attr]
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            start = pos
            try:
                obj, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path} line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})"
                ) from None
            except RecursionError:
                raise DataError(
                    f"{path} line {line_col(start)[0]}: JSON nested too deeply"
                ) from None
            except ValueError as e:  # e.g. an integer over Python's digit limit
                raise DataError(f"{path} line {line_col(start)[0]}: invalid JSON ({e})") from None
            last_line += text.count("\n", last_pos, start)
            last_pos = start
            where = f"record {len(records) + 1} (line {last_line})"
            span = end - start
            if 4 * span > max_record_bytes:  # a char is at most 4 UTF-8 bytes
                nbytes = len(text[start:end].encode("utf-8"))
                if nbytes > max_record_bytes:
                    raise DataError(
                        f"{path} {where}: record is {nbytes} bytes, over the limit of "
                        f"{max_record_bytes} bytes"
                    )
            if not isinstance(obj, dict):
                raise DataError(f"{path} {where}: expected a JSON object, found {_json_type(obj)}")
            records.append(obj)
            locations.append(where)
            pos = _JSON_WS.match(text, end).end()  # type: ignore[union-attr]
            if text.startswith(",", pos):
                pos = _JSON_WS.match(text, pos + 1).end()  # type: ignore[union-attr]
                continue
            if text.startswith("]", pos):
                pos += 1
                break
            if pos >= len(text):
                raise fail(pos, "Unterminated list, expecting ',' or ']'")
            raise fail(pos, "Expecting ',' delimiter")
    pos = _JSON_WS.match(text, pos).end()  # type: ignore[union-attr]
    if pos != len(text):
        raise fail(pos, "Extra data after the end of the list")
    return records, locations
