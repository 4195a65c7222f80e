"""Fuzz every reader of untrusted bytes: only the project's named errors may come out.

Readers under test (each gets its own stream of cases):

- ``header``:     ``safetensors_io.read_header(path, CheckpointError)`` then ``read_tensor`` of every tensor;
- ``index``:      ``sidecar.read_index(path)``;
- ``delta``:      ``sidecar.read_delta(path)`` and ``read_delta(path, index)`` (half the cases each);
- ``checkpoint``: ``checkpoint.open_checkpoint(folder | model.safetensors.index.json | shard)`` then
                  ``read`` of every tensor (mutated shard maps, shards, config.json, symlinks);
- ``records``:    ``data.read_records(path)`` then, when it succeeds, the causal-LM and
                  classification example builders on the records.

The property checked for every case: the reader returns, or raises a ``NeuroAdaError`` subclass
whose message is one non-empty line; any other exception is a failure, as is a case slower than
``--case-seconds`` (a hang) or an allocation beyond ``--mem-headroom`` bytes over the process's
address space at the start (the address-space limit turns it into an error that is not a
``NeuroAdaError``, so it is reported like any other escape). The fuzzed files are a few KB, so a
headroom of 1 GiB is "far beyond the file's size" by six orders of magnitude.

Cases are drawn from seeded generators (``random.Random(hash of reader and seed)``), so a failing
case is replayed exactly by its seed:

    python bench/fuzz_readers.py --cases 10000                 # the dedicated run (every reader)
    python bench/fuzz_readers.py --readers index delta --cases 2000
    python bench/fuzz_readers.py --replay index 1234           # one case, with its traceback

Besides the random cases, every reader gets the truncation of a small valid file at every offset
(``truncation_cases``); those are always errors for the sidecars and shards. The output lists,
per reader, the cases, cases/s, the slowest case, and how many cases ended in each outcome
(``ok`` or the error class). ``tests/test_fuzz.py`` runs the same generators for a few hundred
cases per reader (hypothesis, derandomised) in the regular suite.

What it leaves out: coverage-guided fuzzing (atheris is not a dependency), and files larger than
a few KB (the readers bound every length by the bytes on disk; see ``tests/test_guarantees.py``
for the absurd-shape checks).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import struct
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from neuroada_tools.io.checkpoint import open_checkpoint  # noqa: E402
from neuroada_tools.train.data import build_causal_lm_examples, build_classification_examples, read_records  # noqa: E402
from neuroada_tools.errors import CheckpointError, NeuroAdaError  # noqa: E402
from neuroada_tools.io.safetensors_file import read_header, read_tensor, write_file  # noqa: E402
from neuroada_tools.index.criteria import select  # noqa: E402
from neuroada_tools.io.sidecar import (  # noqa: E402
    DeltaSidecar,
    IndexSidecar,
    TensorEntry,
    fingerprint,
    read_delta,
    read_index,
    write_delta,
    write_index,
)

READER_NAMES = ("header", "index", "delta", "checkpoint", "records")
MAX_MESSAGE = 20_000  # characters; tensor names of a few KB may appear in full, megabyte values may not


class FuzzFailure(AssertionError):
    """A case broke the property: the reader let another exception out, hung, or gave a bad message."""


# =============================================================================== the valid corpus


@dataclass
class Corpus:
    """Small valid files every case starts from (a few KB each)."""

    root: Path
    index: bytes
    index_random: bytes
    delta: bytes
    shard: bytes  # a checkpoint shard with many dtypes, a 0-size tensor and a 0-d tensor
    ckpt_files: dict[str, bytes]  # file name -> bytes of a valid sharded checkpoint folder
    jsonl: list[bytes]  # instruction, classification (string and int labels), text records (JSONL)
    json_list: list[bytes]  # instruction, classification records (JSON list)
    index_obj: IndexSidecar = field(repr=False, default=None)  # type: ignore[assignment]
    tokenizer: object = field(repr=False, default=None)

    def safetensors_files(self) -> list[bytes]:
        return [self.index, self.index_random, self.delta, self.shard]


def _index_for(tensors: dict[str, tuple[torch.Tensor, str]], k: int, criterion: str, seed: int | None) -> IndexSidecar:
    indices, entries = {}, {}
    for name, (stored, layout) in tensors.items():
        logical = stored.t() if layout == "in_out" else stored
        idx = select(logical, min(k, logical.shape[1]), criterion, seed=seed, salt=name)
        indices[name] = idx
        dtype = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[stored.dtype]
        entries[name] = TensorEntry(tuple(logical.shape), layout, dtype, fingerprint(logical, idx))
    return IndexSidecar(k=k, criterion=criterion, indices=indices, entries=entries, seed=seed, model_type="llama")


def build_corpus(root: Path, tokenizer: bool = True) -> Corpus:
    """Write the valid seed files under ``root`` and return their bytes."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weights = {
        "model.layers.0.self_attn.q_proj.weight": (torch.randn(6, 5, generator=g), "out_in"),
        "transformer.h.0.attn.c_attn.weight": (torch.randn(7, 4, generator=g).to(torch.bfloat16), "in_out"),
        "model.layers.1.mlp.down_proj.weight": (torch.randn(3, 8, generator=g).to(torch.float16), "out_in"),
    }
    index = _index_for(weights, 2, "magnitude", None)
    write_index(root / "valid.index.safetensors", index)
    index_random = _index_for(weights, 3, "random", 7)
    write_index(root / "random.index.safetensors", index_random)
    delta = DeltaSidecar(
        index_digest=index.digest,
        deltas={n: torch.randn(t.shape, generator=g) * 0.01 for n, t in index.indices.items()},
        dense={"classifier.weight": torch.randn(2, 5, generator=g), "classifier.bias": torch.zeros(2)},
        task="classification",
        info={"num_labels": 2, "label_names": ["neg", "pos"], "steps": 3},
    )
    write_delta(root / "valid.delta.safetensors", delta)

    shard_tensors = {
        "model.embed_tokens.weight": torch.randn(10, 4, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(2, 4, generator=g).to(torch.float16),
        "model.layers.0.input_layernorm.weight": torch.ones(4, dtype=torch.float64),
        "model.rotary.inv_freq": torch.arange(3, dtype=torch.int64),
        "model.mask": torch.tensor([True, False]),
        "model.empty": torch.zeros(0, 4),
        "model.scalar": torch.tensor(1.5),
        "model.i8": torch.tensor([-1, 2], dtype=torch.int8),
    }
    write_file(root / "shard.safetensors", shard_tensors, {"format": "pt"})

    ckpt = root / "ckpt"
    ckpt.mkdir(exist_ok=True)
    names = sorted(shard_tensors)
    half = len(names) // 2
    shard_names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for fname, part in zip(shard_names, (names[:half], names[half:])):
        write_file(ckpt / fname, {n: shard_tensors[n] for n in part}, {"format": "pt"})
        weight_map.update({n: fname for n in part})
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 1234}, "weight_map": weight_map}, indent=2)
    )
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4, "num_hidden_layers": 2}))
    # a real file outside every case folder: a shard map naming it must be refused, not read
    (root / "secret.safetensors").write_bytes((root / "shard.safetensors").read_bytes())

    instruction = [
        {"instruction": "Name a colour.", "input": "", "output": "Red.", "label": "a"},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "label": "b"},
        {"instruction": "Say yes.", "output": "yes", "label": "a"},
    ]
    classification = [
        {"text": "The quick brown fox.", "label": "pos"},
        {"text": "The lazy dog.", "label": "neg"},
        {"text": "A sparse adapter.", "label": "pos"},
    ]
    jsonl = [
        "".join(json.dumps(r) + "\n" for r in rows).encode()
        for rows in (instruction, classification, [{"text": "plain text"}, {"text": "more"}],
                     [{"text": "int labels", "label": 0}, {"text": "two", "label": 1}, {"text": "three", "label": 1}])
    ]
    json_list = [json.dumps(rows, indent=1).encode() for rows in (instruction, classification)]
    tok = None
    if tokenizer:
        from fixtures.build import train_bpe_tokenizer

        tok = train_bpe_tokenizer()
    return Corpus(
        root=root,
        index=(root / "valid.index.safetensors").read_bytes(),
        index_random=(root / "random.index.safetensors").read_bytes(),
        delta=(root / "valid.delta.safetensors").read_bytes(),
        shard=(root / "shard.safetensors").read_bytes(),
        ckpt_files={p.name: p.read_bytes() for p in sorted(ckpt.iterdir())},
        jsonl=jsonl,
        json_list=json_list,
        index_obj=index,
        tokenizer=tok,
    )


# =============================================================================== weird values

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
             "neuroada.info", "neuroada.writer", "format"]


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
                header[rng.choice(["", "dense.", "dense.x", "x" * 3000, "\u00e9", "\x00", "a.weight", n + " "])] = header.pop(n)
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
        return body.replace('"weight_map": {', '"weight_map": {' + json.dumps(n) + ": " + json.dumps(wm[n]) + ", ").encode()
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
        files["model.safetensors.index.json"] = mutate_shard_map(rng, files["model.safetensors.index.json"], shards, case)
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


def _call_header(path: Path) -> None:
    h = read_header(path, CheckpointError)
    for raw in h.tensors.values():
        read_tensor(path, raw, CheckpointError)


def _call_checkpoint(path: Path) -> None:
    ck = open_checkpoint(path)
    for name in ck.tensors:
        ck.read(name)


@dataclass(frozen=True)
class Reader:
    name: str
    make: Callable[[random.Random, Corpus, Path], tuple[Path, Callable[[], object]]]


def _file_case(fname: str, pick: Callable[[random.Random, Corpus], bytes], call: Callable):
    def make(rng: random.Random, corpus: Corpus, work: Path):
        p = work / fname
        p.write_bytes(pick(rng, corpus))
        return p, lambda: call(rng, corpus, p)

    return make


def _records_call(rng: random.Random, corpus: Corpus, p: Path) -> None:
    """read_records, then both example builders on what it read; each may raise its own DataError."""
    records = read_records(p)
    if corpus.tokenizer is None:
        return
    builders = [
        lambda: build_causal_lm_examples(records, corpus.tokenizer, max_length=rng.choice([8, 32])),
        lambda: build_classification_examples(records, corpus.tokenizer, max_length=32, label_field="label",
                                              num_labels=rng.choice([None, 2, 3])),
    ]
    errors = []
    for build in builders:
        try:
            build()
        except NeuroAdaError as e:
            errors.append(e)
    for e in errors:  # the same property as the reader's own errors
        if not str(e).strip() or "\n" in str(e):
            raise FuzzFailure(f"{type(e).__name__} with a message that is not one line: {str(e)!r}")
    if len(errors) == len(builders):
        raise errors[0]


def _delta_call(rng: random.Random, corpus: Corpus, p: Path) -> None:
    read_delta(p, corpus.index_obj if rng.random() < 0.5 else None)


def _checkpoint_make(rng: random.Random, corpus: Corpus, work: Path):
    target = make_checkpoint_case(rng, corpus, work / "case")
    return target, lambda: _call_checkpoint(target)


READERS: dict[str, Reader] = {
    "header": Reader("header", _file_case(
        "model.safetensors",
        lambda rng, c: mutate_safetensors(rng, rng.choice(c.safetensors_files())),
        lambda rng, c, p: _call_header(p))),
    "index": Reader("index", _file_case(
        "fuzz.index.safetensors",
        lambda rng, c: mutate_safetensors(rng, rng.choice([c.index, c.index, c.index_random, c.delta])),
        lambda rng, c, p: read_index(p))),
    "delta": Reader("delta", _file_case(
        "fuzz.delta.safetensors",
        lambda rng, c: mutate_safetensors(rng, c.delta if rng.random() < 0.9 else c.index),
        _delta_call)),
    "checkpoint": Reader("checkpoint", _checkpoint_make),
    "records": Reader("records", _file_case(
        "train.jsonl", lambda rng, c: mutate_records(rng, c), _records_call)),
}


# =============================================================================== running cases


def case_rng(reader: str, seed: int) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(f"{reader}:{seed}".encode()).digest()[:8], "little"))


class _Hang(BaseException):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise ``_Hang`` in the main thread after ``seconds`` (no-op off the main thread or without SIGALRM)."""
    if seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise _Hang()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def check_outcome(call: Callable[[], object], case_seconds: float = 10.0) -> str:
    """Run one reader call; return ``"ok"`` or the error class name; raise ``FuzzFailure`` otherwise."""
    t0 = time.perf_counter()
    try:
        with time_limit(case_seconds):
            call()
        outcome = "ok"
    except NeuroAdaError as e:
        msg = str(e)
        if not msg.strip() or "\n" in msg or "\r" in msg:
            raise FuzzFailure(f"{type(e).__name__} with a message that is not one line: {msg[:500]!r}") from e
        if len(msg) > MAX_MESSAGE:
            raise FuzzFailure(f"{type(e).__name__} with a message of {len(msg)} characters: {msg[:300]!r}...") from e
        outcome = type(e).__name__
    except _Hang:
        raise FuzzFailure(f"no answer within {case_seconds} s (hang)") from None
    except BaseException as e:  # noqa: BLE001 - the point of the exercise
        if isinstance(e, KeyboardInterrupt):
            raise
        raise FuzzFailure(f"{type(e).__name__} escaped: {e!s:.300}\n{traceback.format_exc()}") from e
    elapsed = time.perf_counter() - t0
    if elapsed > case_seconds:
        raise FuzzFailure(f"took {elapsed:.1f} s (limit {case_seconds} s)")
    return outcome


def run_case(reader: str, seed: int, corpus: Corpus, work: Path, case_seconds: float = 10.0) -> str:
    """Build case ``seed`` of ``reader`` under ``work`` and check it (see ``check_outcome``)."""
    rng = case_rng(reader, seed)
    _, call = READERS[reader].make(rng, corpus, work)
    try:
        return check_outcome(call, case_seconds)
    except FuzzFailure as e:
        raise FuzzFailure(f"{reader} case seed={seed}: {e}") from None


def truncation_cases(corpus: Corpus) -> Iterator[tuple[str, bytes, bool, Callable[[Path], object], str]]:
    """``(reader, truncated bytes, must_fail, call, file name)`` for every offset of each small valid file.

    Every proper prefix of a sidecar or shard must be refused; a prefix of a JSONL file may be a
    valid shorter file (cut at a line end), so it only has to obey the property.
    """
    files = [
        ("index", corpus.index, True, read_index, "t.index.safetensors"),
        ("delta", corpus.delta, True, read_delta, "t.delta.safetensors"),
        ("header", corpus.shard, True, lambda p: read_header(p, CheckpointError), "model.safetensors"),
        ("records", corpus.jsonl[0], False, read_records, "t.jsonl"),
        ("records", corpus.json_list[1], False, read_records, "t.json"),
    ]
    for reader, data, must_fail, call, fname in files:
        for cut in range(len(data)):
            yield reader, data[:cut], must_fail, call, fname
    shard_map = corpus.ckpt_files["model.safetensors.index.json"]
    for cut in range(len(shard_map)):
        yield "checkpoint", shard_map[:cut], True, None, "model.safetensors.index.json"


def run_truncation(corpus: Corpus, work: Path, counts: dict[str, Counter]) -> int:
    """Check every truncation case; return how many ran."""
    n = 0
    ck = work / "trunc-ckpt"
    if ck.exists():
        shutil.rmtree(ck)
    ck.mkdir(parents=True)
    for name, data in corpus.ckpt_files.items():
        (ck / name).write_bytes(data)
    for reader, data, must_fail, call, fname in truncation_cases(corpus):
        if reader == "checkpoint":
            p = ck / fname
            p.write_bytes(data)
            fn = lambda p=p: _call_checkpoint(p)  # noqa: E731
        else:
            p = work / fname
            p.write_bytes(data)
            fn = lambda p=p, call=call: call(p)  # noqa: E731
        outcome = check_outcome(fn)
        if must_fail and outcome == "ok":
            raise FuzzFailure(f"{reader}: a prefix of {len(data)} bytes of a valid {fname} was accepted")
        counts[reader][outcome] += 1
        n += 1
    return n


@contextlib.contextmanager
def address_space_limit(headroom: int) -> Iterator[int | None]:
    """Cap this process's address space at its current size plus ``headroom`` bytes (soft limit).

    An allocation beyond it fails (torch: RuntimeError, Python: MemoryError), which ``check_outcome``
    reports as an escape. Yields the limit, or None where it cannot be set.
    """
    try:
        with open("/proc/self/statm") as f:
            vms = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = vms + headroom
        if hard != resource.RLIM_INFINITY and limit > hard:
            limit = hard
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (OSError, ValueError, AttributeError):
        yield None
        return
    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# =============================================================================== command line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=10_000, help="random cases per reader (default 10000)")
    ap.add_argument("--readers", nargs="+", choices=READER_NAMES, default=list(READER_NAMES))
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--case-seconds", type=float, default=10.0, help="a case slower than this is a hang")
    ap.add_argument("--mem-headroom", type=int, default=1 << 30, help="bytes of address space allowed over the start")
    ap.add_argument("--no-truncation", action="store_true", help="skip the every-offset truncation cases")
    ap.add_argument("--keep-going", action="store_true", help="count failures instead of stopping at the first")
    ap.add_argument("--replay", nargs=2, metavar=("READER", "SEED"), help="run one case and show what happens")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, in /dev/shm if any)")
    args = ap.parse_args(argv)

    import tempfile

    torch.set_num_threads(1)
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # tmpfs: no disk in the loop
    work = args.work or Path(tempfile.mkdtemp(prefix="neuroada-fuzz-", dir=shm))
    work.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(work / "corpus")
    try:
        if args.replay:
            reader, seed = args.replay[0], int(args.replay[1])
            rng = case_rng(reader, seed)
            target, call = READERS[reader].make(rng, corpus, work)
            print(f"case files at {target}")
            try:
                call()
                print("ok")
            except NeuroAdaError as e:
                print(f"{type(e).__name__}: {e}")
            return 0

        counts: dict[str, Counter] = {r: Counter() for r in READER_NAMES}
        failures: list[str] = []
        rows = []
        with address_space_limit(args.mem_headroom) as limit:
            print(f"address space limited to {limit / 2**30:.2f} GiB (start + {args.mem_headroom / 2**30:.2f} GiB)"
                  if limit else "address space limit not available", flush=True)
            if not args.no_truncation:
                t0 = time.perf_counter()
                n = run_truncation(corpus, work, counts)
                print(f"truncation at every offset: {n} cases in {time.perf_counter() - t0:.1f} s", flush=True)
            for reader in args.readers:
                slowest, t0 = 0.0, time.perf_counter()
                rcounts: Counter = Counter()
                for seed in range(args.first_seed, args.first_seed + args.cases):
                    c0 = time.perf_counter()
                    try:
                        outcome = run_case(reader, seed, corpus, work, args.case_seconds)
                    except FuzzFailure as e:
                        failures.append(str(e))
                        outcome = "FAILURE"
                        print(f"FAILURE {e}", file=sys.stderr, flush=True)
                        if not args.keep_going:
                            break
                    slowest = max(slowest, time.perf_counter() - c0)
                    rcounts[outcome] += 1
                secs = time.perf_counter() - t0
                done = sum(rcounts.values())
                rows.append((reader, done, secs, slowest, rcounts))
                print(f"{reader:<11} {done:>6} cases  {done / secs:8.0f} cases/s  slowest {slowest * 1000:7.1f} ms  "
                      + ", ".join(f"{k} {v}" for k, v in sorted(rcounts.items(), key=lambda kv: -kv[1])), flush=True)
                counts[reader].update(rcounts)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"\npeak RSS {peak:.0f} MiB")
        print("\n| reader | cases (incl. truncation) | outcomes |")
        print("|---|---:|---|")
        for reader in READER_NAMES:
            if counts[reader]:
                print(f"| {reader} | {sum(counts[reader].values())} | "
                      + ", ".join(f"{k} {v}" for k, v in sorted(counts[reader].items(), key=lambda kv: -kv[1])) + " |")
        if failures:
            print(f"\n{len(failures)} FAILURES (first: {failures[0].splitlines()[0]})")
            return 1
        print("\nno failures: only NeuroAdaError subclasses came out")
        return 0
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
