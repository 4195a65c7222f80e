"""Hostile bytes for every reader of untrusted files: only the project's named errors come out.

The regular-suite share of ``tests/fuzz`` (``python -m tests.fuzz``) (which runs >= 10,000 cases per reader):
a few hundred derandomised hypothesis cases per reader (``NEUROADA_FUZZ_CASES``, default 300),
the truncation of small valid files at every offset, and one regression test per bug the fuzzer
found. The whole module runs under an address-space cap of 1 GiB over its start, so an allocation
far beyond the few-KB files (``[2**40, 2**40]`` taken at its word) fails the test instead of
swapping. See the bench script's docstring for the readers and the mutations.

Sharded-index rules already covered in ``tests/test_index.py`` (``../x``, ``/etc/passwd``,
``sub/../../x``, a tensor listed twice or missing from its shard, a Hugging Face cache of symlinks)
are not repeated here; the gaps are.
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neuroada_tools.errors import CheckpointError, DataError, SidecarError
from neuroada_tools.index.build import run_index
from neuroada_tools.io.checkpoint import open_checkpoint
from neuroada_tools.io.safetensors_file import read_header, read_tensor, write_file
from neuroada_tools.io.sidecar import read_delta, read_index
from neuroada_tools.train.data import read_records
from tests.fuzz.corpus import READER_NAMES, build_corpus
from tests.fuzz.harness import address_space_limit, run_case, run_truncation

CASES = int(os.environ.get("NEUROADA_FUZZ_CASES", "300"))
HEADROOM = 1 << 30


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("fuzz-corpus"))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """Where cases are written: tmpfs (/dev/shm) when there is one, thousands of small files are
    slow on a busy disk."""
    import shutil
    import tempfile

    if os.access("/dev/shm", os.W_OK):
        d = Path(tempfile.mkdtemp(prefix="neuroada-fuzz-", dir="/dev/shm"))
        yield d
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp("fuzz-scratch")


@pytest.fixture(scope="module", autouse=True)
def memory_cap(corpus):
    """Everything in this module runs with the address space capped at its start + 1 GiB."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # no new worker threads (and their arenas) while the cap holds
    try:
        with address_space_limit(HEADROOM) as limit:
            yield limit
    finally:
        torch.set_num_threads(threads)


def st_file(tmp_path: Path, header: object, body: bytes = b"", raw: bytes | None = None) -> Path:
    blob = raw if raw is not None else json.dumps(header).encode()
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(blob)) + blob + body)
    return p


# ---------------------------------------------------------------- the property, sampled


@pytest.mark.parametrize("reader", READER_NAMES)
def test_only_named_errors(reader, corpus, scratch):
    work = scratch / reader
    work.mkdir()
    seen: Counter = Counter()

    @settings(max_examples=CASES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(seed=st.integers(0, 2**32 - 1))
    def check(seed):
        seen[run_case(reader, seed, corpus, work, case_seconds=10.0)] += 1

    check()
    assert sum(seen.values()) >= CASES
    assert len(seen) >= 2, f"{reader}: every case ended the same way ({seen}); the mutations are too weak"


def test_truncation_at_every_offset(corpus, scratch):
    counts = {r: Counter() for r in READER_NAMES}
    n = run_truncation(corpus, scratch, counts)  # raises if a proper prefix of a sidecar/shard is accepted
    assert n > 2000
    assert set(counts["index"]) == {"SidecarError"} and set(counts["delta"]) == {"SidecarError"}
    assert set(counts["header"]) == {"CheckpointError"}
    assert set(counts["checkpoint"]) == {"CheckpointError"}


# ---------------------------------------------------------------- absurd sizes: rejected before allocation


@pytest.mark.parametrize("shape", [[2**40, 2**40], [2**30, 2**30], [2**31, 2**31, 2**31], [2**64], [2**62, 4]])
def test_absurd_shape_rejected_from_the_header(tmp_path, shape, memory_cap):
    """Offsets that match the absurd shape run past the end; offsets that match the file do not
    match the shape; either way nothing is allocated (the module's address-space cap would fail)."""
    nbytes = 4
    for d in shape:
        nbytes *= d
    expect = r"tensor 'w'(: invalid shape .* \(too large\)|{})"
    p = st_file(tmp_path, {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, nbytes]}}, b"\0" * 64)
    for call in (read_header, open_checkpoint):
        with pytest.raises(CheckpointError, match=expect.format(r" ends at byte \d+ but the file holds only 64")):
            call(p)
    with pytest.raises(SidecarError, match=expect.format("")):
        read_index(p)
    p = st_file(tmp_path, {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 64]}}, b"\0" * 64)
    with pytest.raises(CheckpointError, match=expect.format(r": 64 bytes for shape")):
        read_header(p)


@pytest.mark.parametrize("shape", [[0, 2**70], [0, 2**63], [2**62, 0, 2**62]])
def test_zero_size_tensor_with_unrepresentable_dims(tmp_path, shape):
    """Bug found by fuzzing: 0 bytes passed the size check, then torch failed on the shape."""
    p = st_file(tmp_path, {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}})
    for call in (read_header, open_checkpoint):
        with pytest.raises(CheckpointError, match=r"tensor 'w': invalid shape .* \(too large\)"):
            call(p)


def test_zero_size_tensors_still_read(tmp_path):
    p = st_file(tmp_path, {"w": {"dtype": "F32", "shape": [0, 2**40], "data_offsets": [0, 0]},
                           "v": {"dtype": "I8", "shape": [0] * 100, "data_offsets": [0, 0]}})
    h = read_header(p)
    assert read_tensor(p, h.tensors["w"]).shape == (0, 2**40)


def test_shape_product_work_is_bounded(tmp_path):
    """Bug class: a shape of many large dims made Python multiply huge integers; now it stops early."""
    shape = [10**12] * 200_000
    p = st_file(tmp_path, {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(CheckpointError, match=r"invalid shape \[1000000000000, .*\.\.\. \(too large\)"):
        read_header(p)


# ---------------------------------------------------------------- regressions found by the fuzzer


def test_deeply_nested_header_json(tmp_path):
    """Bug: RecursionError escaped from json.loads on ``[[[[...``."""
    p = st_file(tmp_path, None, raw=b"[" * 100_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        read_header(p)
    with pytest.raises(SidecarError, match="nested too deeply"):
        read_index(p)


def test_unhashable_dtype(tmp_path):
    """Bug: ``"dtype": ["F32"]`` raised TypeError (unhashable) instead of a named error."""
    p = st_file(tmp_path, {"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(CheckpointError, match=r"tensor 'w': unsupported dtype \['F32'\]"):
        read_header(p)


def test_metadata_must_be_an_object_even_when_empty(tmp_path):
    p = st_file(tmp_path, {"__metadata__": [], "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(CheckpointError, match="__metadata__ must map strings to strings"):
        read_header(p)


def test_long_values_are_cut_in_messages(tmp_path):
    p = st_file(tmp_path, {"w": {"dtype": "F32", "shape": [-1] * 100_000, "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(CheckpointError) as e:
        read_header(p)
    assert len(str(e.value)) < 300 and str(e.value).endswith("...")


def _index_with_entry(corpus, tmp_path: Path, change) -> Path:
    """The corpus index with its neuroada.tensors entries changed by ``change(dict)``."""
    src = corpus.root / "valid.index.safetensors"
    h = read_header(src)
    meta = dict(h.metadata)
    entries = json.loads(meta["neuroada.tensors"])
    change(entries)
    meta["neuroada.tensors"] = json.dumps(entries)
    tensors = {n: read_tensor(src, raw).clone() for n, raw in h.tensors.items()}
    out = tmp_path / "bad.index.safetensors"
    write_file(out, tensors, meta)
    return out


@pytest.mark.parametrize("bad", [[6, 2**70], [6, 2**31], [6, 2**31 + 1], [2**64, 5]])
def test_index_entry_with_huge_dims(corpus, tmp_path, bad):
    """Bug: d_in = 2**70 reached a torch comparison with int32 indices and raised OverflowError."""
    name = "model.layers.0.self_attn.q_proj.weight"

    def change(entries):
        entries[name]["shape"] = bad

    p = _index_with_entry(corpus, tmp_path, change)
    with pytest.raises(SidecarError, match=r"shape must be \[d_out, d_in\] of positive integers"):
        read_index(p)


def test_deeply_nested_sidecar_metadata(corpus, tmp_path):
    src = corpus.root / "valid.delta.safetensors"
    h = read_header(src)
    tensors = {n: read_tensor(src, raw).clone() for n, raw in h.tensors.items()}
    meta = dict(h.metadata, **{"neuroada.info": "[" * 50_000})
    write_file(tmp_path / "d.safetensors", tensors, meta)
    with pytest.raises(SidecarError, match="neuroada.info is nested too deeply"):
        read_delta(tmp_path / "d.safetensors")


@pytest.mark.parametrize("content", ['{"text": "a", "label": ' + "9" * 5000 + "}\n",
                                     '[{"text": "a", "label": ' + "9" * 5000 + "}]"])
def test_records_with_a_huge_integer(tmp_path, content):
    """Bug: Python's int digit limit raised a bare ValueError (not a JSONDecodeError)."""
    p = tmp_path / "train.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match=r"train.jsonl line 1: invalid JSON \(Exceeds the limit"):
        read_records(p)


def test_json_list_does_not_reserve_the_size_limit(tmp_path):
    """Bug: ``f.read(max_file_bytes + 1)`` reserved 2 GiB for any JSON-list file. Under a cap of
    256 MiB over the current size a small file must still read."""
    p = tmp_path / "train.json"
    p.write_text('[{"text": "a"}, {"text": "b"}]')
    with address_space_limit(256 << 20):
        assert len(read_records(p)) == 2


# ---------------------------------------------------------------- sharded checkpoints: the gaps


def _sharded(tmp_path: Path) -> Path:
    m = tmp_path / "m"
    m.mkdir()
    write_file(m / "a.safetensors", {"x.weight": torch.ones(2, 2)})
    write_file(m / "b.safetensors", {"y.weight": torch.zeros(3)})
    (m / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x.weight": "a.safetensors", "y.weight": "b.safetensors"}}))
    return m


def _map(m: Path, shard_for_x) -> None:
    (m / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x.weight": shard_for_x, "y.weight": "b.safetensors"}}))


def test_absolute_shard_path_refused_even_inside_the_folder(tmp_path):
    m = _sharded(tmp_path)
    _map(m, str((m / "a.safetensors").resolve()))
    with pytest.raises(CheckpointError, match="lies outside the model folder"):
        open_checkpoint(m)


@pytest.mark.parametrize("evil", ["~/a.safetensors", "..\\a.safetensors", "./../m/a.safetensors"])
def test_other_escaping_shard_paths_refused(tmp_path, evil):
    m = _sharded(tmp_path)
    _map(m, evil)
    with pytest.raises(CheckpointError, match="lies outside the model folder"):
        open_checkpoint(m)


@pytest.mark.parametrize("odd", ["x" * 300 + ".safetensors", "a\x00.safetensors", "", "."])
def test_unopenable_shard_names_are_named_errors(tmp_path, odd):
    """Bug: a name too long for the file system raised OSError (ENAMETOOLONG)."""
    m = _sharded(tmp_path)
    _map(m, odd)
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: .*(is missing|shard must be a file "
        r"name)"):
        open_checkpoint(m)


def test_shard_in_a_subfolder_and_symlinked_model_folder_work(tmp_path):
    m = _sharded(tmp_path)
    (m / "sub").mkdir()
    os.replace(m / "a.safetensors", m / "sub" / "a.safetensors")
    _map(m, "sub/a.safetensors")
    link = tmp_path / "link-to-model"
    link.symlink_to(m, target_is_directory=True)
    ck = open_checkpoint(link)
    assert torch.equal(ck.read("x.weight"), torch.ones(2, 2))
    assert open_checkpoint(link / "model.safetensors.index.json").tensors.keys() == ck.tensors.keys()


def test_shard_symlink_loop_and_folder_are_named_errors(tmp_path):
    m = _sharded(tmp_path)
    (m / "loop.safetensors").symlink_to("loop.safetensors")
    _map(m, "loop.safetensors")
    with pytest.raises(CheckpointError, match="shard 'loop.safetensors' is missing"):
        open_checkpoint(m)
    (m / "dir.safetensors").mkdir()
    _map(m, "dir.safetensors")
    with pytest.raises(CheckpointError, match="shard 'dir.safetensors' is missing"):
        open_checkpoint(m)


def test_hf_cache_index_equals_plain_folder_index(fixture_models, tmp_path):
    """Symlinks into ../../blobs (the real cache layout) give the same bytes as the plain folder."""
    src = fixture_models["llama"]
    blobs = tmp_path / "models--x" / "blobs"
    snap = tmp_path / "models--x" / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        blob = blobs / f"{i:04d}deadbeef"
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    run_index(src, 2, tmp_path / "plain.index.safetensors")
    run_index(snap, 2, tmp_path / "cache.index.safetensors")
    assert (tmp_path / "plain.index.safetensors").read_bytes() == (tmp_path / "cache.index.safetensors").read_bytes()
