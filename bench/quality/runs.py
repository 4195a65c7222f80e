"""The runs of the quality benchmark and the JSONL file that holds them.

Every finished training run is one line of ``--results`` (appended, flushed and fsynced as soon
as it is scored), and a run whose key is already there is skipped, so an interrupted benchmark
continues where it stopped when the same command is run again. The key is
``(protocol, task, method, phase, seed, lr)``; ``protocol`` is a digest of what makes runs
comparable (the task settings, the split sizes, the model and the device type), so a file may
hold several protocols and each is reported apart.

A method's runs: ``phase="sweep"``, seed 0, one per lr of its grid, scored on the validation slice;
when the best is at an end of a grid of 3 or more, one more lr beyond that end (same ratio), once.
The pick is the best validation accuracy (ties: lower validation loss; diverged runs never).
Then ``phase="test"`` for every seed at the picked lr, scored on the test split (and the
validation slice): the seed-0 model of the sweep is reused when this process still holds it,
otherwise retrained (``"retrained": true``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

from quality.measure import evaluate, train_run
from quality.methods import Context, Method, build_method, release
from quality.tasks import TaskData, TaskSettings, total_steps

VERSION = 1


def _clean(v):
    """JSON without NaN/Inf (null instead)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def lr_key(lr: float) -> str:
    return f"{lr:.6g}"


class Store:
    """The records of ``path`` (JSONL; None: in memory only), looked up by run key."""

    def __init__(self, path: Path | None):
        self.path = path
        self.records: list[dict] = []
        self.bad_lines = 0
        if path is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by an interrupted write
                    self.bad_lines += 1
                    continue
                if isinstance(rec, dict) and rec.get("v") == VERSION:
                    self.records.append(rec)

    @staticmethod
    def key(rec: dict) -> tuple:
        return (rec["protocol"], rec["task"], rec["method"], rec["phase"], rec.get("seed"),
                lr_key(rec["lr"]) if rec.get("lr") is not None else None)

    def find(self, protocol: str, task: str, method: str, phase: str, seed=None, lr=None) -> dict | None:
        want = (protocol, task, method, phase, seed, lr_key(lr) if lr is not None else None)
        for rec in reversed(self.records):  # the latest
            if self.key(rec) == want:
                return rec
        return None

    def add(self, rec: dict) -> dict:
        rec = _clean({"v": VERSION, **rec, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        self.records.append(rec)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab+") as f:  # appends go to the end whatever the position
                f.seek(0, os.SEEK_END)
                cut = False
                if f.tell() > 0:  # a line cut by a killed run: end it, so this record stays whole
                    f.seek(-1, os.SEEK_END)
                    cut = f.read(1) != b"\n"
                f.write((("\n" if cut else "") + json.dumps(rec) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
        return rec


def model_digest(model_dir: Path) -> str:
    """The model's config and the names and sizes of its files (cheap; enough to tell models apart)."""
    h = hashlib.sha256()
    cfg = model_dir / "config.json"
    h.update(cfg.read_bytes() if cfg.is_file() else b"")
    for p in sorted(model_dir.iterdir()):
        if p.is_file():
            h.update(f"{p.name}:{p.stat().st_size}".encode())
    return h.hexdigest()[:12]


def protocol_of(task: str, s: TaskSettings, data: TaskData, model_dir: Path, device: str) -> dict:
    """What makes the runs of a task comparable, and its digest ``id``."""
    p = {"task": task, **asdict(s), "steps_total": total_steps(s, len(data.train)),
         "train": len(data.train), "val": len(data.val), "test": len(data.test),
         "model": model_digest(model_dir), "device": device.split(":")[0]}
    p["id"] = hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()[:10]
    return p


def best(sweep: dict[float, dict]) -> float:
    """The lr of the best validation accuracy (ties: lower validation loss; diverged runs last)."""
    def score(lr):
        r = sweep[lr]
        if r.get("diverged") or r.get("val_acc") is None:
            return (0, -1.0, 0.0, -lr)
        loss = r["val_loss"] if r.get("val_loss") is not None else float("inf")
        return (1, r["val_acc"], -loss, -lr)

    return max(sweep, key=score)


def extension(grid: tuple[float, ...], sweep: dict[float, dict]) -> float | None:
    """The one extra lr past an end of the grid when the pick over the grid is at that end."""
    lrs = sorted(grid)
    if len(lrs) < 3:
        return None
    pick = best({lr: sweep[lr] for lr in lrs})
    if pick == lrs[-1]:
        return lrs[-1] * lrs[-1] / lrs[-2]
    if pick == lrs[0]:
        return lrs[0] * lrs[0] / lrs[1]
    return None


def _train_and_score(ctx: Context, data: TaskData, task: str, s: TaskSettings, method: Method, seed: int,
                     lr: float, steps: int) -> tuple[object, dict]:
    """Build, train ``steps`` steps and score on the validation slice: ``(model, record fields)``."""
    t0 = time.perf_counter()
    model, params, info = build_method(ctx, task, method, seed)
    build_s = time.perf_counter() - t0
    tr = train_run(ctx, model, params, data, task, steps, s.batch, lr, seed)
    val = evaluate(ctx, model, data.val, task, s.eval_batch) if not tr["diverged"] else {}
    rec = {**{k: v for k, v in info.items() if k != "adapted"}, **tr, "build_s": build_s,
           "val_acc": val.get("acc"), "val_loss": val.get("loss"), "val_s": val.get("seconds")}
    if "acc_norm" in val:
        rec["val_acc_norm"] = val["acc_norm"]
    if method.criterion == "gradient" and method.kind == "neuroada":
        rec["index_s"] = ctx.index_seconds.get((method.k, "gradient", 0, task))
    return model, rec


def run_method(ctx: Context, store: Store, data: TaskData, task: str, s: TaskSettings, method: Method,
               seeds: list[int], protocol: dict, env: dict, log) -> None:
    """The sweep and the test runs of ``method`` (see the module docstring), skipping finished ones."""
    steps = protocol["steps_total"]
    base = {"protocol": protocol["id"], "task": task, "method": method.name, "kind": method.kind, "k": method.k,
            "criterion": method.criterion if method.kind == "neuroada" else None, "grid": list(method.lrs), **env}
    if method.kind == "zero-shot":
        return _zero_shot(ctx, store, data, task, s, method, protocol, base, log)
    kept: dict[float, object] = {}
    sweep: dict[float, dict] = {}

    def sweep_run(lr: float) -> None:
        rec = store.find(protocol["id"], task, method.name, "sweep", 0, lr)
        if rec is None:
            model, got = _train_and_score(ctx, data, task, s, method, 0, lr, steps)
            rec = store.add({**base, "phase": "sweep", "seed": 0, "lr": lr, **got})
            kept[lr] = model
            log(f"  {task} {method.name} lr={lr:.3g}: val acc {_pct(rec['val_acc'])} loss {_num(rec['val_loss'])}"
                f" ({rec['train_s']:.0f}s train, {rec['step_ms']:.0f} ms/step)")
        else:
            log(f"  {task} {method.name} lr={lr:.3g}: done before (val acc {_pct(rec['val_acc'])}), skipped")
        sweep[lr] = rec

    for lr in method.lrs:
        sweep_run(lr)
    extra = extension(method.lrs, sweep)
    if extra is not None:
        sweep_run(extra)
    pick = best(sweep)
    for lr in list(kept):
        if lr != pick:
            release(kept.pop(lr))
    for seed in seeds:
        if store.find(protocol["id"], task, method.name, "test", seed, pick) is not None:
            log(f"  {task} {method.name} lr={pick:.3g} seed {seed}: done before, skipped")
            continue
        if seed == 0 and pick in kept:
            model, got = kept.pop(pick), {k: v for k, v in sweep[pick].items() if k not in base and k not in (
                "v", "phase", "seed", "lr", "time")}
            got["reused_sweep"] = True
        else:
            model, got = _train_and_score(ctx, data, task, s, method, seed, pick, steps)
            got["retrained"] = seed == 0
        test = evaluate(ctx, model, data.test, task, s.eval_batch) if not got["diverged"] else {}
        release(model)
        rec = store.add({**base, "phase": "test", "seed": seed, "lr": pick, **got, "test_acc": test.get("acc"),
                         "test_loss": test.get("loss"), "test_s": test.get("seconds"),
                         **({"test_acc_norm": test["acc_norm"]} if "acc_norm" in test else {}),
                         "lr_grid": sorted(sweep)})
        log(f"  {task} {method.name} lr={pick:.3g} seed {seed}: test acc {_pct(rec['test_acc'])} "
            f"({rec['train_s']:.0f}s train, {_num(rec['test_s'], '.0f')}s test, peak +{_num(rec['peak_mib'], '.0f')}"
            f" MiB)")
    for model in kept.values():
        release(model)


def _zero_shot(ctx: Context, store: Store, data: TaskData, task: str, s: TaskSettings, method: Method,
               protocol: dict, base: dict, log) -> None:
    """The untrained model scored once (seed 0, lr 0): validation and test. It has no seeds to pair;
    the report compares it with every seed of the reference."""
    if store.find(protocol["id"], task, method.name, "test", 0, 0.0) is not None:
        log(f"  {task} {method.name}: done before, skipped")
        return
    t0 = time.perf_counter()
    model, _, info = build_method(ctx, task, method, 0)
    build_s = time.perf_counter() - t0
    val = evaluate(ctx, model, data.val, task, s.eval_batch)
    test = evaluate(ctx, model, data.test, task, s.eval_batch)
    release(model)
    rec = store.add({**base, "phase": "test", "seed": 0, "lr": 0.0, **{k: v for k, v in info.items() if k != "adapted"},
                     "steps": 0, "train_s": 0.0, "step_ms": None, "peak_mib": None, "diverged": False,
                     "build_s": build_s,
                     "val_acc": val["acc"], "val_loss": val["loss"], "val_s": val["seconds"],
                     "test_acc": test["acc"], "test_loss": test["loss"], "test_s": test["seconds"],
                     **({"val_acc_norm": val["acc_norm"], "test_acc_norm": test["acc_norm"]} if "acc_norm" in test
                        else {})})
    log(f"  {task} {method.name}: test acc {_pct(rec['test_acc'])} ({rec['test_s']:.0f}s test)")


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _num(x, fmt: str = ".4f") -> str:
    return "n/a" if x is None else format(x, fmt)
