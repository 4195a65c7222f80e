"""sidecar.py and safetensors_io.py: every MUST of formats/ rejected with its named error."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch

from neuroada_tools.errors import FingerprintError, SidecarError
from neuroada_tools.index.criteria import select
from neuroada_tools.io.safetensors_file import write_file
from neuroada_tools.io.sidecar import (
    DeltaSidecar,
    IndexSidecar,
    TensorEntry,
    fingerprint,
    read_delta,
    read_index,
    verify_fingerprint,
    write_delta,
    write_index,
)

NAME = "model.layers.0.mlp.up_proj.weight"


def make_index(tmp_path: Path, k: int = 3) -> tuple[IndexSidecar, torch.Tensor, Path]:
    w = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    idx = select(w, k)
    index = IndexSidecar(k=k, criterion="magnitude", indices={NAME: idx},
                         entries={NAME: TensorEntry((8, 10), "out_in", "F32", fingerprint(w, idx))})
    path = tmp_path / "a.index.safetensors"
    write_index(path, index)
    return index, w, path


def raw_write(path: Path, tensors: dict, meta: dict) -> Path:
    write_file(path, tensors, meta)
    return path


def index_meta(tmp_path: Path) -> dict:
    from safetensors import safe_open

    _, _, p = make_index(tmp_path)
    with safe_open(str(p), "pt") as f:
        return dict(f.metadata())


def test_roundtrip_and_safetensors_compatible(tmp_path):
    index, w, p = make_index(tmp_path)
    back = read_index(p)
    assert back.k == 3 and back.criterion == "magnitude" and back.digest == index.digest
    assert torch.equal(back.indices[NAME], index.indices[NAME])
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(p))[NAME], index.indices[NAME])
    verify_fingerprint(back, NAME, w, "base")


def test_fingerprint_same_shape_other_values_refused(tmp_path):
    index, w, _ = make_index(tmp_path)
    w2 = w.clone()
    w2[5, 0] += 1.0  # d_out=8 < 16: every row is sampled, so any change is seen
    with pytest.raises(FingerprintError, match=re.escape(f"base: '{NAME}' differs from the base")):
        verify_fingerprint(index, NAME, w2, "base")


def test_fingerprint_catches_a_merged_base(tmp_path):
    w = torch.randn(64, 32)
    idx = select(w, 2)
    fp = fingerprint(w, idx)
    merged = w.clone()
    r = 3  # not a sampled row (rows 0, 4, 8, ...)
    merged[r, idx[r, 0]] += 1e-3
    assert fingerprint(merged, idx) != fp


def test_fingerprint_dtype_independent_for_exact_upcast():
    w = torch.randn(20, 12).to(torch.bfloat16)
    idx = select(w, 4)
    assert fingerprint(w, idx) == fingerprint(w.float(), idx)


# ------------------------------------------------------------ hostile safetensors bytes


def test_not_safetensors(tmp_path):
    p = tmp_path / "x.index.safetensors"
    p.write_bytes(b"hello")
    with pytest.raises(SidecarError, match=r"x.index.safetensors: not a safetensors file \(only 5 bytes\)"):
        read_index(p)


def test_header_past_end(tmp_path):
    p = tmp_path / "x.index.safetensors"
    p.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(SidecarError, match=r"header length 1000 runs past the end of the 10-byte file"):
        read_index(p)


def test_truncated_file(tmp_path):
    _, _, p = make_index(tmp_path)
    data = p.read_bytes()
    p.write_bytes(data[:-5])
    with pytest.raises(SidecarError, match=rf"a.index.safetensors: truncated: tensor '{re.escape(NAME)}' ends at byte"):
        read_index(p)


def test_duplicate_keys_in_header(tmp_path):
    p = tmp_path / "d.index.safetensors"
    hdr = b'{"a":{"dtype":"I32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}}'
    p.write_bytes(struct.pack("<Q", len(hdr)) + hdr + b"\0" * 4)
    with pytest.raises(SidecarError, match=r"duplicate key 'a'"):
        read_index(p)


def test_overlapping_and_trailing_bytes(tmp_path):
    p = tmp_path / "o.index.safetensors"
    hdr = b'{"a":{"dtype":"I32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"I32","shape":[1],"data_offsets":[4,8]}}'
    p.write_bytes(struct.pack("<Q", len(hdr)) + hdr + b"\0" * 8)
    with pytest.raises(SidecarError, match=r"tensor 'b' overlaps the previous tensor"):
        read_index(p)
    hdr = b'{"a":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}}'
    p.write_bytes(struct.pack("<Q", len(hdr)) + hdr + b"\0" * 9)
    with pytest.raises(SidecarError, match=r"5 trailing bytes after the last tensor"):
        read_index(p)


def test_shape_bytes_mismatch(tmp_path):
    p = tmp_path / "s.index.safetensors"
    hdr = b'{"a":{"dtype":"I32","shape":[3],"data_offsets":[0,8]}}'
    p.write_bytes(struct.pack("<Q", len(hdr)) + hdr + b"\0" * 8)
    with pytest.raises(SidecarError, match=r"tensor 'a': 8 bytes for shape \[3\] I32 \(expected 12\)"):
        read_index(p)


# ------------------------------------------------------------ index rules


def _with(tmp_path, meta_changes=None, tensor=None, name=NAME):
    meta = index_meta(tmp_path)
    meta.update(meta_changes or {})
    meta = {k: v for k, v in meta.items() if v is not None}
    t = tensor if tensor is not None else select(torch.randn(8, 10), 3)
    return raw_write(tmp_path / "bad.index.safetensors", {name: t}, meta)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"neuroada.magic": None}, "not an index sidecar (magic is None)"),
        ({"neuroada.magic": "neuroada-delta"}, "not an index sidecar (it is a delta sidecar)"),
        ({"neuroada.version": "2"}, "unsupported format version '2' (this tool reads 1)"),
        ({"neuroada.k": "0"}, "neuroada.k must be an integer >= 1, found '0'"),
        ({"neuroada.k": "3.5"}, "neuroada.k must be an integer >= 1, found '3.5'"),
        ({"neuroada.criterion": "saliency"},
         "neuroada.criterion 'saliency' not one of magnitude, smallest, random, gradient"),
        ({"neuroada.criterion": "random", "neuroada.seed": ""}, "criterion 'random' requires neuroada.seed"),
        ({"neuroada.tensors": None}, "missing neuroada.tensors metadata"),
        ({"neuroada.tensors": "{"}, "neuroada.tensors is not valid JSON"),
        ({"neuroada.tensors": "{}"}, f"tensor '{NAME}' has no entry in neuroada.tensors"),
    ],
)
def test_index_metadata_rules(tmp_path, changes, message):
    p = _with(tmp_path, changes)
    with pytest.raises(SidecarError, match=re.escape(f"bad.index.safetensors: {message}")):
        read_index(p)


CALIBRATION = {"batch_size": 8, "data_sha256": "ab" * 32, "examples": 256, "max_length": 256, "task": "causal-lm"}


def _calibration(**kw) -> str:
    doc = {**CALIBRATION, **kw}
    return json.dumps({k: v for k, v in doc.items() if v is not None})


def test_gradient_index_roundtrips_its_calibration(tmp_path):
    index, _, _ = make_index(tmp_path)
    index.criterion, index.calibration = "gradient", dict(CALIBRATION)
    p = tmp_path / "g.index.safetensors"
    write_index(p, index)
    back = read_index(p)
    assert back.criterion == "gradient" and back.calibration == CALIBRATION and back.seed is None
    assert read_index(make_index(tmp_path)[2]).calibration is None  # files without the key still read


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"neuroada.criterion": "gradient"}, "criterion 'gradient' requires neuroada.calibration"),
        ({"neuroada.calibration": _calibration()}, "neuroada.calibration is only for criterion 'gradient', "
         "found 'magnitude'"),
        ({"neuroada.criterion": "gradient", "neuroada.calibration": "{"}, "neuroada.calibration is not valid JSON"),
        ({"neuroada.criterion": "gradient", "neuroada.calibration": "[]"},
         "neuroada.calibration must be an object with keys batch_size, data_sha256, examples, max_length, task, "
         "found 'list'"),
        ({"neuroada.criterion": "gradient", "neuroada.calibration": _calibration(task=None)},
         "neuroada.calibration must be an object with keys batch_size, data_sha256, examples, max_length, task, "
         "found ['batch_size', 'data_sha256', 'examples', 'max_length']"),
        ({"neuroada.criterion": "gradient", "neuroada.calibration": _calibration(seed=3)},
         "neuroada.calibration must be an object with keys batch_size, data_sha256, examples, max_length, task, "
         "found ['batch_size', 'data_sha256', 'examples', 'max_length', 'seed', 'task']"),
        ({"neuroada.criterion": "gradient", "neuroada.calibration": _calibration(examples=0)},
         "neuroada.calibration examples must be an integer >= 1, found 0"),
        ({"neuroada.criterion": "gradient", "neuroada.calibration": _calibration(batch_size=True)},
         "neuroada.calibration batch_size must be an integer >= 1, found True"),
        ({"neuroada.criterion": "gradient", "neuroada.calibration": _calibration(max_length="256")},
         "neuroada.calibration max_length must be an integer >= 1, found '256'"),
        ({"neuroada.criterion": "gradient", "neuroada.calibration": _calibration(data_sha256="AB" * 32)},
         "neuroada.calibration data_sha256 must be 64 lowercase hex digits"),
        ({"neuroada.criterion": "gradient", "neuroada.calibration": _calibration(task="translation")},
         "neuroada.calibration task 'translation' not one of causal-lm, classification, multiple-choice"),
    ],
)
def test_index_calibration_rules(tmp_path, changes, message):
    p = _with(tmp_path, changes)
    with pytest.raises(SidecarError, match=re.escape(f"bad.index.safetensors: {message}")):
        read_index(p)


def _entries(**kw):
    e = {"shape": [8, 10], "layout": "out_in", "dtype": "F32", "fingerprint": "0" * 64}
    e.update(kw)
    return json.dumps({NAME: e})


@pytest.mark.parametrize(
    "entry, message",
    [
        (dict(shape=[8]), "shape must be [d_out, d_in] of positive integers, found [8]"),
        (dict(layout="sideways"), "layout must be 'out_in' or 'in_out', found 'sideways'"),
        (dict(dtype="I32"), "dtype must be a float dtype, found 'I32'"),
        (dict(fingerprint="XYZ"), "fingerprint must be 64 lowercase hex digits"),
    ],
)
def test_index_entry_rules(tmp_path, entry, message):
    p = _with(tmp_path, {"neuroada.tensors": _entries(**entry)})
    with pytest.raises(SidecarError, match=re.escape(f"neuroada.tensors['{NAME}']: {message}")):
        read_index(p)


def test_entry_without_tensor(tmp_path):
    doc = json.loads(_entries())
    doc["extra.weight"] = doc[NAME]
    p = _with(tmp_path, {"neuroada.tensors": json.dumps(doc)})
    with pytest.raises(SidecarError, match=r"lists 'extra.weight' but the file has no such tensor"):
        read_index(p)


@pytest.mark.parametrize(
    "tensor, message",
    [
        (torch.zeros(8, 3, dtype=torch.int64), f"'{NAME}': dtype must be I32, found int64"),
        (torch.zeros(7, 3, dtype=torch.int32), f"'{NAME}': shape [7, 3] does not match [d_out=8, k]"),
        (
            torch.arange(4, dtype=torch.int32).expand(8, 4).contiguous(),
            f"'{NAME}': 4 columns per row, expected 1..min(k=3, d_in=10)",
        ),
        (torch.tensor([[0, 1, 2]] * 7 + [[0, 1, 10]], dtype=torch.int32), f"'{NAME}' row 7: index 10 outside 0..9"),
        (torch.tensor([[0, 1, 2]] * 7 + [[0, -1, 2]], dtype=torch.int32), f"'{NAME}' row 7: index -1 outside 0..9"),
        (
            torch.tensor([[0, 1, 2]] * 5 + [[4, 4, 5]] + [[0, 1, 2]] * 2, dtype=torch.int32),
            f"'{NAME}' row 5: indices not increasing (4 >= 4)",
        ),
    ],
)
def test_index_tensor_rules(tmp_path, tensor, message):
    p = _with(tmp_path, {"neuroada.tensors": _entries()}, tensor=tensor)
    with pytest.raises(SidecarError, match=re.escape(f"bad.index.safetensors: {message}")):
        read_index(p)


# ------------------------------------------------------------ delta rules


def make_delta(tmp_path, index, **kw) -> Path:
    d = DeltaSidecar(
        index_digest=index.digest,
        deltas={NAME: torch.randn(8, 3)},
        dense={"classifier.weight": torch.randn(2, 8)},
        task="classification",
        info={"num_labels": 2},
    )
    for k, v in kw.items():
        setattr(d, k, v)
    p = tmp_path / "a.delta.safetensors"
    write_delta(p, d)
    return p


def test_delta_roundtrip(tmp_path):
    index, _, ip = make_index(tmp_path)
    p = make_delta(tmp_path, index)
    d = read_delta(p, read_index(ip))
    assert set(d.deltas) == {NAME} and set(d.dense) == {"classifier.weight"}
    assert d.task == "classification" and d.info == {"num_labels": 2}
    from safetensors.torch import load_file

    assert "dense.classifier.weight" in load_file(str(p))


def test_delta_for_another_index_refused(tmp_path):
    index, _, _ = make_index(tmp_path)
    p = make_delta(tmp_path, index, index_digest="a" * 64)
    with pytest.raises(
        SidecarError, match=r"a.delta.safetensors: made for index sha256 aaaaaaaaaaaa\.\.\., but the given index is"
    ):
        read_delta(p, index)


def test_delta_shape_and_set_mismatch(tmp_path):
    index, _, _ = make_index(tmp_path)
    p = make_delta(tmp_path, index, deltas={NAME: torch.zeros(8, 2)})
    with pytest.raises(SidecarError, match=re.escape(f"'{NAME}': shape [8, 2] does not match the index [8, 3]")):
        read_delta(p, index)
    p = make_delta(tmp_path, index, deltas={"other.weight": torch.zeros(8, 3)})
    with pytest.raises(SidecarError, match=re.escape(f"no delta for index tensor '{NAME}'")):
        read_delta(p, index)


def test_delta_nan_and_dtype_refused(tmp_path):
    index, _, _ = make_index(tmp_path)
    bad = torch.zeros(8, 3)
    bad[2, 1] = float("nan")
    p = make_delta(tmp_path, index, deltas={NAME: bad})
    with pytest.raises(SidecarError, match=re.escape(f"'{NAME}': contains NaN or Inf")):
        read_delta(p)
    meta = {"neuroada.magic": "neuroada-delta", "neuroada.version": "1", "neuroada.index_sha256": index.digest}
    p = raw_write(tmp_path / "b.delta.safetensors", {NAME: torch.zeros(8, 3, dtype=torch.bfloat16)}, meta)
    with pytest.raises(
        SidecarError, match=re.escape(f"b.delta.safetensors: '{NAME}': dtype must be F32, found bfloat16")
    ):
        read_delta(p)


def test_index_given_as_delta_and_vice_versa(tmp_path):
    index, _, ip = make_index(tmp_path)
    with pytest.raises(SidecarError, match=r"a.index.safetensors: not a delta sidecar \(it is an index sidecar\)"):
        read_delta(ip)
    dp = make_delta(tmp_path, index)
    with pytest.raises(SidecarError, match=r"a.delta.safetensors: not an index sidecar \(it is a delta sidecar\)"):
        read_index(dp)


def test_bad_digest_field(tmp_path):
    meta = {"neuroada.magic": "neuroada-delta", "neuroada.version": "1", "neuroada.index_sha256": "xyz"}
    p = raw_write(tmp_path / "c.delta.safetensors", {NAME: torch.zeros(8, 3)}, meta)
    with pytest.raises(
        SidecarError, match=r"c.delta.safetensors: neuroada.index_sha256 must be 64 lowercase hex digits"
    ):
        read_delta(p)
