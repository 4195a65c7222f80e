"""Readers under test, one case at a time: time and memory limits, outcome checks, truncation sweeps."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import resource
import shutil
import signal
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from neuroada_tools.errors import CheckpointError, NeuroAdaError
from neuroada_tools.io.checkpoint import open_checkpoint
from neuroada_tools.io.safetensors_file import read_header, read_tensor
from neuroada_tools.io.sidecar import (
    read_delta,
    read_index,
)
from neuroada_tools.train.data import build_causal_lm_examples, build_classification_examples, read_records
from tests.fuzz.corpus import (
    MAX_MESSAGE,
    Corpus,
    FuzzFailure,
)
from tests.fuzz.mutate import (
    make_checkpoint_case,
    mutate_records,
    mutate_safetensors,
)


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
