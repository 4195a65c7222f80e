"""Mutations: random bytes, JSON-aware header and metadata changes, absurd shapes and offsets, shard maps."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import struct
from pathlib import Path

from tests.fuzz.corpus import (
    Corpus,
)

INTERESTING_INTS = [0, 1, -1, 2, 7, 8, 255, 256, 2**31 - 1, 2**31, -(2**31), 2**32, 2**40, 2**53, 2**62,
                    2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), 10**30, 10**300]
INTERESTING_STRINGS = [
    "", "0", "1", "01", " 1", "1 ", "-1", "1e3", "1.0", "9" * 13, "9" * 12, "\uff11", "NaN", "true", "null",
    "neuroada-index", "neuroada-delta", "neuroada-train-state", "2", "magnitude", "random", "smallest",
    "causal-lm", "classification", "out_in", "in_out", "F32", "BF16", "I32", "{}", "[]", "[1]", '{"a": {}}',
    "a" * 64, "0" * 64, "A" * 64, "0" * 63, "g" * 64, "x" * 5000, "[" * 3000, '{"a":' * 3000,
    "dense.", "dense.classifier.weight", "__metadata__", "../secret.safetensors", "\x00", "\ud800", "\n",
]
BYTE_TOKENS = [b"{", b"}", b"[", b"]", b'"', b":", b",", b"\\", b"\n", b"\r\n", b"\x00", b"\xff", b"\xfe",
               b"\xef\xbb\xbf", b"\xc3", b"\xed\xa0\x80", b"-", b"0", b"9" * 30, b"e999", b"NaN", b"Infinity",
               b"null", b"true", b" " * 17, b"\t", b"\\u0000", b"\\ud800"]


def weird_value(rng: random.Random, depth: int = 0) -> object:
    """A JSON value of a surprising type or size."""
    r = rng.random()
    if r < 0.25:
        return rng.choice(INTERESTING_INTS)
    if r < 0.45:
        return rng.choice(INTERESTING_STRINGS)
    if r < 0.55:
        return rng.choice([None, True, False])
    if r < 0.65:
        return rng.choice([0.0, -0.0, 1.5, -2.5, 1e308, float("nan"), float("inf"), float("-inf"), 4.0])
    if r < 0.75 or depth > 2:
        return rng.choice([[], [1], [[]], [1, 2], [-1, 2], [2**40, 2**40], list(range(200)), [0] * 70])
    if r < 0.85:
        return {"a": weird_value(rng, depth + 1)} if rng.random() < 0.7 else {}
    nest = rng.choice([10, 100, 990, 5000])
    return json.loads("[" * nest + "]" * nest) if nest < 900 else _Raw("[" * nest + "]" * nest)


class _Raw(str):
    """JSON text to splice in verbatim (too deep for ``json.dumps`` to produce)."""


def dumps(obj: object, rng: random.Random | None = None) -> str:
    """``json.dumps`` that splices ``_Raw`` values in verbatim (deeply nested JSON)."""
    raws: list[str] = []

    def prep(o: object) -> object:
        if isinstance(o, _Raw):
            raws.append(str(o))
            return f"\x01RAW{len(raws) - 1}\x01"
        if isinstance(o, dict):
            return {k: prep(v) for k, v in o.items()}
        if isinstance(o, list):
            return [prep(v) for v in o]
        return o

    ascii_ = rng.random() < 0.5 if rng else True
    text = json.dumps(prep(obj), ensure_ascii=ascii_)
    for i, raw in enumerate(raws):
        text = text.replace(f'"\\u0001RAW{i}\\u0001"', raw).replace(f'"\x01RAW{i}\x01"', raw)
    return text


# =============================================================================== safetensors mutations


def split_st(data: bytes) -> tuple[dict | None, bytes]:
    """``(header object, data bytes)`` of a valid file (None if the header does not parse)."""
    n = struct.unpack("<Q", data[:8])[0]
    try:
        return json.loads(data[8 : 8 + n]), data[8 + n :]
    except (ValueError, RecursionError):
        return None, data[8:]


def join_st(header_text: str | bytes, body: bytes, rng: random.Random | None = None) -> bytes:
    blob = header_text.encode("utf-8", "surrogatepass") if isinstance(header_text, str) else header_text
    if rng is not None and rng.random() < 0.5:
        blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + body


def _mutate_entry(rng: random.Random, entry: object, header: dict) -> object:
    if not isinstance(entry, dict) or rng.random() < 0.08:
        return weird_value(rng)
    e = dict(entry)
    which = rng.choice(["dtype", "shape", "data_offsets", "shape", "data_offsets", "drop", "extra"])
    if which == "dtype":
        e["dtype"] = rng.choice(["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL",
                                 "F8_E4M3", "U64", "f32", "", None, 4, ["F32"]])
    elif which == "shape":
        shape = e.get("shape") if isinstance(e.get("shape"), list) else [1]
        choices = [
            lambda: [d * 2 if isinstance(d, int) else d for d in shape],
            lambda: shape + [1],
            lambda: shape[:-1],
            lambda: list(reversed(shape)),
            lambda: [2**40, 2**40],
            lambda: [0, 2**70],
            lambda: [0] + shape,
            lambda: [-1] + shape[1:],
            lambda: [1.5],
            lambda: [True, 2],
            lambda: ["3"],
            lambda: [],
            lambda: [[]],
            lambda: [rng.choice(INTERESTING_INTS) for _ in range(rng.randint(1, 4))],
            lambda: [1] * rng.choice([64, 65, 300]),
            lambda: weird_value(rng),
        ]
        e["shape"] = rng.choice(choices)()
    elif which == "data_offsets":
        offs = e.get("data_offsets") if isinstance(e.get("data_offsets"), list) else [0, 0]
        b, en = (offs + [0, 0])[:2] if all(isinstance(o, int) for o in offs) else (0, 0)
        others = [v["data_offsets"] for v in header.values() if isinstance(v, dict) and "data_offsets" in v]
        choices = [
            lambda: [b, en + 1], lambda: [b - 1, en], lambda: [en, b], lambda: [b + 1, en + 1],
            lambda: [-4, en], lambda: [b, 2**64], lambda: [b, 2**63], lambda: [float(b), float(en)],
            lambda: [b], lambda: [b, en, 0], lambda: rng.choice(others) if others else [0, 0],
            lambda: [0, 0], lambda: [rng.choice(INTERESTING_INTS), rng.choice(INTERESTING_INTS)],
            lambda: weird_value(rng),
        ]
        e["data_offsets"] = rng.choice(choices)()
    elif which == "drop":
        e.pop(rng.choice(["dtype", "shape", "data_offsets"]), None)
    else:
        e[rng.choice(["extra", "dtype ", "DATA_OFFSETS"])] = weird_value(rng)
    return e


def _mutate_inner_json(rng: random.Random, text: str) -> object:
    """Mutate a JSON document stored in a metadata string (neuroada.tensors, neuroada.info)."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return weird_value(rng)
    if isinstance(doc, dict) and doc and rng.random() < 0.85:
        key = rng.choice(list(doc))
        r = rng.random()
        if r < 0.15:
            del doc[key]
        elif r < 0.25:
            doc[key + rng.choice(["x", ".weight", ""])] = copy.deepcopy(doc[key])
        elif r < 0.35:
            doc[key] = weird_value(rng)
        elif isinstance(doc[key], dict):
            inner = doc[key]
            field_ = rng.choice(list(inner) + ["shape", "layout", "dtype", "fingerprint"])
            if field_ == "shape" and rng.random() < 0.5:
                inner[field_] = rng.choice([[2**31, 5], [6, 2**31], [6, 2**31 + 1], [2**70, 5], [6, 2**70], [0, 5],
                                            [6, 0], [6], [6, 5, 1], [6.0, 5], [-6, 5], [True, 5], [6, 1], [6, 9]])
            elif rng.random() < 0.2:
                inner.pop(field_, None)
            else:
                inner[field_] = weird_value(rng)
        else:
            doc[key] = weird_value(rng)
    else:
        doc = weird_value(rng)
    return _Raw(dumps(doc)) if not isinstance(doc, _Raw) else doc


META_KEYS = ["neuroada.magic", "neuroada.version", "neuroada.k", "neuroada.criterion", "neuroada.seed",
             "neuroada.tensors", "neuroada.model_type", "neuroada.index_sha256", "neuroada.task",
             "neuroada.info", "neuroada.writer", "neuroada.calibration", "format"]


def mutate_header_json(rng: random.Random, data: bytes) -> bytes:
    """JSON-aware: change dtypes, shapes, offsets, names, metadata values and types; keep the bytes after."""
    header, body = split_st(data)
    if not isinstance(header, dict):
        return mutate_bytes(rng, data)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        names = [k for k in header if k != "__metadata__"]
        r = rng.random()
        if r < 0.40 and names:  # one tensor entry
            n = rng.choice(names)
            header[n] = _mutate_entry(rng, header[n], header)
        elif r < 0.50 and names:  # rename / delete / duplicate a tensor
            n = rng.choice(names)
            op = rng.random()
            if op < 0.4:
                new_name = rng.choice(["", "dense.", "dense.x", "x" * 3000, "\u00e9", "\x00", "a.weight", n + " "])
                header[new_name] = header.pop(n)
            elif op < 0.7:
                del header[n]
            else:
                header[n + ".copy"] = copy.deepcopy(header[n])
        elif r < 0.92:  # metadata
            meta = header.get("__metadata__")
            if not isinstance(meta, dict) or rng.random() < 0.08:
                header["__metadata__"] = weird_value(rng) if rng.random() < 0.8 else {}
                continue
            key = rng.choice(list(meta) + META_KEYS + ["neuroada.tensors", "neuroada.info"] * 3)
            op = rng.random()
            if op < 0.15:
                meta.pop(key, None)
            elif op < 0.55 and key in ("neuroada.tensors", "neuroada.info") and isinstance(meta.get(key), str):
                v = _mutate_inner_json(rng, meta[key])
                meta[key] = str(v) if isinstance(v, _Raw) else dumps(v)
            elif op < 0.9:
                meta[key] = rng.choice(INTERESTING_STRINGS)
            else:
                meta[key] = weird_value(rng)  # not a string: the safetensors rule says strings only
        elif r < 0.95:
            header = weird_value(rng)  # not an object at all
            break
        else:  # a duplicate key, spliced into the text
            text = dumps(header, rng)
            if names:
                n = rng.choice(names)
                dup = json.dumps(n) + ":" + dumps(header[n])
                text = text[:-1] + ("," if len(text) > 2 else "") + dup + "}"
            return join_st(text, body, rng)
    text = dumps(header, rng)
    if rng.random() < 0.2:
        body = mutate_bytes(rng, body) if body else body
    return join_st(text, body, rng)


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """Byte-level: flips, splices of JSON-ish tokens, insertions, deletions, truncation, extension."""
    b = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 4, 8])):
        op = rng.random()
        pos = rng.randrange(len(b) + 1)
        if op < 0.3 and b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op < 0.5:
            tok = rng.choice(BYTE_TOKENS)
            b[pos : pos + rng.choice([0, len(tok)])] = tok
        elif op < 0.6 and b:
            b[pos : pos + rng.randint(1, 16)] = b""
        elif op < 0.7 and b:
            i = rng.randrange(len(b))
            b[i] = rng.choice([0, 0xFF, 0x7F, 0x80, ord("0"), ord("9"), ord('"'), ord("}")])
        elif op < 0.8:
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
        elif op < 0.9 and b:
            src = rng.randrange(len(b))
            b[pos:pos] = b[src : src + rng.randint(1, 64)]
        else:
            del b[rng.randrange(len(b) + 1) :]
    return bytes(b)


def mutate_length_field(rng: random.Random, data: bytes) -> bytes:
    n = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else 0
    v = rng.choice([0, 1, 2, 7, n - 1, n + 1, n + 8, len(data) - 8, len(data) - 7, 100 * 1024 * 1024,
                    100 * 1024 * 1024 + 1, 2**63, 2**64 - 1, rng.randrange(2**64)])
    return struct.pack("<Q", v % 2**64) + data[8:]


def mutate_tensor_data(rng: random.Random, data: bytes) -> bytes:
    """Overwrite 4-byte words of the tensor bytes with interesting int32 and float32 patterns."""
    header, body = split_st(data)
    if header is None or not body:
        return mutate_bytes(rng, data)
    prefix = data[: len(data) - len(body)]
    b = bytearray(body)
    for _ in range(rng.choice([1, 1, 2, 5])):
        i = rng.randrange(0, max(1, len(b) - 3)) & ~3
        word = rng.choice([
            struct.pack("<i", v) for v in (-1, 0, 1, 2, 4, 5, 7, 8, 2**31 - 1, -(2**31))
        ] + [struct.pack("<f", v) for v in (float("nan"), float("inf"), float("-inf"), 1e38, -0.0, 65504.0)]
          + [b"\x00\x00\xc0\x7f", b"\x01\x00\x80\x7f"])
        b[i : i + 4] = word
    return prefix + bytes(b[: len(body)])


def random_file(rng: random.Random) -> bytes:
    r = rng.random()
    size = rng.choice([0, 1, 7, 8, 9, 16, 64, 300, 2000])
    junk = bytes(rng.randrange(256) for _ in range(size))
    if r < 0.4:
        return junk
    if r < 0.7:  # a plausible length and JSON-looking bytes
        text = b"".join(rng.choice(BYTE_TOKENS + [b'"a"', b"1", b'"dtype"', b'"shape"', b'"data_offsets"'])
                        for _ in range(rng.randint(0, 40)))
        return struct.pack("<Q", len(text)) + text + junk[: rng.choice([0, 4, 16])]
    doc = weird_value(rng)
    text = dumps(doc).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(text)) + text


def mutate_safetensors(rng: random.Random, data: bytes) -> bytes:
    r = rng.random()
    if r < 0.05:
        return random_file(rng)
    if r < 0.60:
        out = mutate_header_json(rng, data)
    elif r < 0.80:
        out = mutate_tensor_data(rng, data)
    elif r < 0.85:
        out = mutate_length_field(rng, data)
    elif r < 0.90:
        out = data[: rng.randrange(len(data) + 1)]
    else:
        out = mutate_bytes(rng, data)
    if rng.random() < 0.05:
        out = mutate_bytes(rng, out)
    return out


# =============================================================================== records mutations


def mutate_records(rng: random.Random, corpus: Corpus) -> bytes:
    is_jsonl = rng.random() < 0.6
    base = rng.choice(corpus.jsonl if is_jsonl else corpus.json_list)
    r = rng.random()
    if r < 0.06:
        return rng.choice([b"", b"\n\n", b"   \t\r\n", b"\xef\xbb\xbf", b"\xef\xbb\xbf\n", b"[]", b"[ ]", b"{}",
                           b"null", b"[null]", b"\xef\xbb\xbf[\n]", b"[1", b"[{}", b"[{},", b"[{}]]"])
    if r < 0.12:
        return random_file(rng)[8:]
    if r < 0.45:
        return mutate_bytes(rng, base)
    if r < 0.52:
        return base[: rng.randrange(len(base) + 1)]
    if r < 0.56:  # a gigantic line / record: over the 1 MiB limit
        big = b'{"text": "' + b"a" * ((1 << 20) + rng.choice([-20, 0, 5, 100])) + b'", "label": 1}'
        return big + b"\n" if rng.random() < 0.5 else b"[" + big + b"]"
    if r < 0.6:  # huge integer / deep nesting / NaN
        tok = rng.choice([b"9" * 5000, b"-" + b"9" * 4301, b"[" * 100000, b'{"a":' * 50000, b"NaN", b"-Infinity",
                          b"1e999999", b"\"\\ud800\"", b"\"\\u0000\""])
        line = b'{"text": "x", "label": ' + tok + b"}"
        return base + line + b"\n" if is_jsonl else b"[" + line + b"]"
    if r < 0.65:
        return base
    # record-level: change field values and types, drop fields, add records of other shapes
    rows = [json.loads(x) for x in rng.choice(corpus.jsonl).decode().splitlines()]
    for _ in range(rng.choice([1, 2, 3])):
        i = rng.randrange(len(rows))
        row = rows[i]
        op = rng.random()
        if op < 0.15 or not isinstance(row, dict):
            rows[i] = weird_value(rng)
        elif op < 0.3 and row:
            del row[rng.choice(list(row))]
        elif op < 0.4:
            rows.append({})
        else:
            key = rng.choice(list(row) + ["label", "text", "instruction", "input", "output", "answer"])
            row[key] = weird_value(rng)
    if rng.random() < 0.5:
        text = "".join(dumps(x, rng) + rng.choice(["\n", "\r\n", "\n\n"]) for x in rows)
    else:
        text = "[" + ",\n".join(dumps(x, rng) for x in rows) + "]"
    return text.encode("utf-8", "surrogatepass")


# =============================================================================== checkpoint cases


def mutate_shard_map(rng: random.Random, text: bytes, shard_names: list[str], case: Path) -> bytes:
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return mutate_bytes(rng, text)
    wm = doc["weight_map"]
    names = list(wm)
    r = rng.random()
    if r < 0.45:
        n = rng.choice(names)
        wm[n] = rng.choice([
            "../secret.safetensors", str(case.parent / "secret.safetensors"), "/etc/passwd", "~/x.safetensors",
            "..\\secret.safetensors", "sub/../../secret.safetensors", "./" + shard_names[0], "", ".", "..",
            "x" * 300 + ".safetensors", "a\x00b", "config.json", "model.safetensors.index.json",
            rng.choice(shard_names), "missing.safetensors", "sub/" + shard_names[1], "link.safetensors",
            "loop.safetensors", "dir.safetensors",
        ]) if rng.random() < 0.8 else weird_value(rng)
    elif r < 0.55:
        del wm[rng.choice(names)]
    elif r < 0.65:
        wm[rng.choice(["not.there.weight", "model.extra"])] = rng.choice(shard_names)
    elif r < 0.72:  # a tensor listed twice (duplicate key in the text)
        n = rng.choice(names)
        body = json.dumps(doc)
        extra = json.dumps(n) + ": " + json.dumps(wm[n]) + ", "
        return body.replace('"weight_map": {', '"weight_map": {' + extra).encode()
    elif r < 0.8:
        doc["weight_map"] = weird_value(rng)
    elif r < 0.85:
        doc = weird_value(rng)
    else:
        return mutate_bytes(rng, text)
    return dumps(doc, rng).encode("utf-8", "surrogatepass")


def make_checkpoint_case(rng: random.Random, corpus: Corpus, case: Path) -> Path:
    """Write a (mutated) checkpoint folder at ``case``; return the path to open."""
    if case.exists() or case.is_symlink():
        shutil.rmtree(case)
    case.mkdir()
    files = dict(corpus.ckpt_files)
    shards = sorted(n for n in files if n.endswith(".safetensors"))
    r = rng.random()
    if r < 0.4:
        key = "model.safetensors.index.json"
        files[key] = mutate_shard_map(rng, files[key], shards, case)
    elif r < 0.7:
        s = rng.choice(shards)
        files[s] = mutate_safetensors(rng, files[s])
    elif r < 0.8:
        files["config.json"] = rng.choice([mutate_bytes(rng, files["config.json"]),
                                           dumps(weird_value(rng)).encode("utf-8", "surrogatepass")])
    for name, data in files.items():
        (case / name).write_bytes(data)
    # file-system oddities the shard map may point at
    extra = rng.random()
    if extra < 0.15:  # a shard replaced by a symlink inside the folder (the HF cache): must keep working
        s = rng.choice(shards)
        (case / "blobs").mkdir()
        os.replace(case / s, case / "blobs" / s)
        os.symlink(Path("blobs") / s, case / s)
    elif extra < 0.2:
        os.symlink(case.parent / "secret.safetensors", case / "link.safetensors")
    elif extra < 0.25:
        os.symlink("loop.safetensors", case / "loop.safetensors")
    elif extra < 0.3:
        (case / "dir.safetensors").mkdir()
    elif extra < 0.35:
        (case / rng.choice(shards)).unlink()
    elif extra < 0.38:
        (case / "model.safetensors.index.json").unlink()  # two shards, no map: ambiguous
    entry = rng.random()
    if entry < 0.6:
        return case
    if entry < 0.9:
        return case / "model.safetensors.index.json"
    return case / rng.choice(shards)


# =============================================================================== the readers
