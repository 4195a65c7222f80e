"""The valid files every fuzz case starts from (sidecars, checkpoints, records)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from neuroada_tools.index.criteria import select
from neuroada_tools.io.safetensors_file import write_file
from neuroada_tools.io.sidecar import (
    DeltaSidecar,
    IndexSidecar,
    TensorEntry,
    fingerprint,
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
