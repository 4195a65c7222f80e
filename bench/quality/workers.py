"""``--workers N``: the methods of the protocol run in N processes of one thread each.

On a shared 2-core machine one process with 2 threads loses most of its time when a neighbour
takes a core (its threads wait on each other: a step measured 4x slower than with 1 thread), while
two 1-thread processes made 1.6x the steps per second of one. The parent starts N children with
the same arguments; each child takes the next method nobody has taken yet (a claim is a file made
with ``O_CREAT | O_EXCL`` in a folder of this parent's), runs it and appends its runs to the shared
``--results`` (one ``write`` per line, ``O_APPEND``). When they are done the parent runs the
interleaved step-time pass alone and renders the report; ``--estimate`` children save their
measurements for the parent to project.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ENTRY = Path(__file__).resolve().parents[1] / "bench_quality.py"
_CHILD_FLAGS = {"--workers": 1, "--threads": 1, "--results": 1, "--out": 1}  # replaced or dropped


def claim(args, task: str, method: str) -> bool:
    """True when this process takes ``method`` of ``task`` (always, without workers)."""
    if args._claims is None:
        return True
    path = Path(args._claims) / f"{task}--{method}"
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(args._worker).encode())
    os.close(fd)
    return True


def save_estimate(args, task: str, rows: list[dict]) -> None:
    for row in rows:
        (Path(args._claims) / f"estimate--{task}--{row['method']}.json").write_text(json.dumps(row))


def load_estimate(args, task: str) -> list[dict]:
    if args._claims is None:
        return []
    return [json.loads(p.read_text()) for p in sorted(Path(args._claims).glob(f"estimate--{task}--*.json"))]


def _child_argv(argv: list[str]) -> list[str]:
    out, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
            continue
        name = a.split("=", 1)[0]
        if name in _CHILD_FLAGS:
            skip = _CHILD_FLAGS[name] if "=" not in a else 0
            continue
        out.append(a)
    return out


def parent(args, argv: list[str], tasks, methods, settings, log) -> int:
    """Run the children, then this process's share: the timing pass and the report."""
    from quality.run import work

    with tempfile.TemporaryDirectory(prefix="quality-claims-") as claims:
        if args.results is None:  # --quick without --results: a file the children can share
            args.results = Path(claims) / "runs.jsonl"
        threads = max(1, args.threads)
        cmd = [sys.executable, str(ENTRY), *_child_argv(argv), "--threads", str(threads),
               "--results", str(args.results), "--workers", str(args.workers), "--_claims", claims]
        log(f"{args.workers} worker processes, {threads} thread(s) each; results {args.results}")
        procs = [subprocess.Popen([*cmd, "--_worker", str(i)]) for i in range(args.workers)]
        codes = [p.wait() for p in procs]
        if any(codes):
            log(f"worker exit codes {codes}: what they finished is in {args.results}; run the command again to "
                "continue")
        args._claims = claims  # every method is claimed: this process only does the rest
        import torch

        rc = work(args, torch, tasks, methods, settings)
    return rc or (1 if any(codes) else 0)
