"""``python -m tests.fuzz``: the dedicated fuzz run (see ``tests/fuzz/__init__.py``)."""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from neuroada_tools.errors import NeuroAdaError
from tests.fuzz.corpus import (
    READER_NAMES,
    FuzzFailure,
    build_corpus,
)
from tests.fuzz.harness import (
    READERS,
    address_space_limit,
    case_rng,
    run_case,
    run_truncation,
)


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
    ap.add_argument(
        "--work", type=Path, default=None, help="scratch folder (default: a temporary one, in /dev/shm if any)"
    )
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
            print(
                f"address space limited to {limit / 2**30:.2f} GiB (start + {args.mem_headroom / 2**30:.2f} GiB)"
                if limit
                else "address space limit not available",
                flush=True,
            )
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
                print(
                    f"{reader:<11} {done:>6} cases  {done / secs:8.0f} cases/s  slowest {slowest * 1000:7.1f} ms  "
                    + ", ".join(f"{k} {v}" for k, v in sorted(rcounts.items(), key=lambda kv: -kv[1])),
                    flush=True,
                )
                counts[reader].update(rcounts)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"\npeak RSS {peak:.0f} MiB")
        print("\n| reader | cases (incl. truncation) | outcomes |")
        print("|---|---:|---|")
        for reader in READER_NAMES:
            if counts[reader]:
                print(
                    f"| {reader} | {sum(counts[reader].values())} | "
                    + ", ".join(f"{k} {v}" for k, v in sorted(counts[reader].items(), key=lambda kv: -kv[1]))
                    + " |"
                )
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
