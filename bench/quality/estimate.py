"""``--estimate``: the projected wall time of the protocol from a few measured steps per method.

For each method: the model is built (timed), then one warm-up step and ``n`` timed steps of the
shipped ``optimizer_step`` on batches of the protocol's seed-0 epoch picked at evenly spaced
quantiles of their padded size (batches are grouped by length, so step times spread ~4x; the mean
over quantiles estimates the mean step); the validation and test scoring are timed on evenly spaced
slices and scaled to the whole sets. The projection counts, per method, ``len(grid)`` sweep runs
(+1 when the pick lands at an end of the grid), ``seeds - 1`` more training runs (seed 0 is the
sweep's), a validation scoring per run and a test scoring per seed; plus the gradient criterion's
calibration and the interleaved timing pass. On a shared machine the measured steps move with the
neighbours' load: the projection is as good as the few seconds it was measured in.

A method that already has finished runs in ``--results`` of a comparable protocol (same task, model,
batch, max_length, device and threads; any number of epochs) is projected from those runs instead
(:func:`from_runs`): a whole run's seconds per step include what a few timed steps miss (collation,
the long batches' share, allocator growth): on the 2-core machine (2026-12-04) 4 timed steps per method came
out 1.2-2.2x faster per step than the same method's quietest whole 2-epoch run (head 2.2x, LoRA 2.0x,
magnitude 1.5x), and projected 2.1 h for a protocol that the finished runs project at 3.2 h.
"""

from __future__ import annotations

import os
import statistics
import time

from quality.measure import evaluate, time_steps
from quality.methods import Context, Method, build_method, release
from quality.tasks import TaskData, TaskSettings, steps_per_epoch, train_batches


def _padded(data: TaskData, idx: list[int]) -> int:
    exs = [data.train[i] for i in idx]
    if isinstance(exs[0]["input_ids"][0], list):
        return len(exs) * max(len(e["input_ids"]) for e in exs) * max(len(r) for e in exs for r in e["input_ids"])
    return len(exs) * max(len(e["input_ids"]) for e in exs)


def _spread(items: list, n: int) -> list:
    """``n`` items at evenly spaced quantiles of ``items`` (all of them if fewer)."""
    if len(items) <= n:
        return list(items)
    return [items[int((i + 0.5) * len(items) / n)] for i in range(n)]


def _row(m: Method, seeds: list[int], build_s: float, step_s: float, val_s: float, test_s: float, index_s: float,
         source: str, load: float | None) -> dict:
    """A method's costs and the runs it makes: ``len(grid)`` sweep runs and ``seeds - 1`` more (seed 0
    is the sweep's), a build and a validation scoring each, a test scoring per seed, the calibration once;
    ``ext_fixed_s``: what the extra lr past a grid end adds besides its steps."""
    if m.kind == "zero-shot":  # scored once, never trained
        return {"method": m.name, "build_s": build_s, "step_s": 0.0, "val_s": val_s, "test_s": test_s, "runs": 0,
                "index_s": 0.0, "fixed_s": build_s + val_s + test_s, "ext_fixed_s": 0.0, "load": load, "from": source}
    runs = len(m.lrs) + len(seeds) - 1
    return {"method": m.name, "build_s": build_s, "step_s": step_s, "val_s": val_s, "test_s": test_s, "runs": runs,
            "index_s": index_s, "fixed_s": runs * (build_s + val_s) + len(seeds) * test_s + index_s,
            "ext_fixed_s": build_s + val_s, "load": load, "from": source}


def measure(ctx: Context, data: TaskData, task: str, s: TaskSettings, methods: list[Method], seeds: list[int],
            n_steps: int, log) -> list[dict]:
    """One row per method: build, mean step, validation and test scoring seconds, and the runs it makes."""
    per_epoch = steps_per_epoch(len(data.train), s.batch)
    ranked = sorted(train_batches(data.train, s.batch, per_epoch, 0), key=lambda b: _padded(data, b))
    picks = _spread(ranked, n_steps)
    warm = ranked[len(ranked) // 2]
    val_slice = _spread(data.val, 48)
    test_slice = _spread(data.test, 96)
    rows = []
    for m in methods:
        t0 = time.perf_counter()
        model, params, _ = build_method(ctx, task, m, 0)
        build_s = time.perf_counter() - t0
        index_s = ctx.index_seconds.get((m.k, "gradient", 0, task), 0.0) if m.criterion == "gradient" else 0.0
        build_s -= index_s  # the calibration is paid once, not per run
        step_s = statistics.mean(time_steps(ctx, model, params, data, task, [warm] + picks)[1:]) if params else 0.0
        val_s = evaluate(ctx, model, val_slice, task, s.eval_batch)["seconds"] * len(data.val) / len(val_slice)
        test_s = evaluate(ctx, model, test_slice, task, s.eval_batch)["seconds"] * len(data.test) / len(test_slice)
        release(model)
        rows.append(_row(m, seeds, build_s, step_s, val_s, test_s, index_s, f"{len(picks)} steps",
                         os.getloadavg()[0]))
        log(f"  {task} {m.name}: build {build_s:.1f}s, step {1e3 * step_s:.0f} ms (mean of {len(picks)} at "
            f"quantiles of padded size), val {val_s:.0f}s, test {test_s:.0f}s"
            + (f", calibration {index_s:.0f}s" if index_s else ""))
    return rows


def _comparable(setting: dict, protocol: dict) -> bool:
    keys = ("task", "model", "batch", "max_length", "eval_batch", "device")
    return all(setting.get(k) == protocol.get(k) for k in keys)


def from_runs(records: list[dict], protocol: dict, methods: list[Method], seeds: list[int], threads: int,
              n_val: int, n_test: int) -> dict[str, dict]:
    """Rows as :func:`measure` makes them, for the methods with finished runs of a comparable protocol.

    Per method, over its finished runs: seconds per training step = the least ``train_s / steps``
    (a neighbour only adds time; the least is the closest to the quiet machine the projection is for),
    validation and test scoring = the least seconds per example times this protocol's set sizes, build
    = the median. Worked example: runs of 252 steps that took 480 s and 530 s give 1.905 s per step;
    a 126-step run is then projected at 240 s of training.
    """
    settings = {r["protocol"]: r["settings"] for r in records if r.get("phase") == "protocol" and r.get("settings")}
    ok = {pid for pid, st in settings.items() if _comparable(st, protocol)}
    rows = {}
    for m in methods:
        runs = [r for r in records if r.get("protocol") in ok and r.get("method") == m.name
                and r.get("phase") in ("sweep", "test") and r.get("threads") == threads
                and r.get("steps") and r.get("train_s") and not r.get("diverged")]
        if not runs:
            continue
        step_s = min(r["train_s"] / r["steps"] for r in runs)
        build = [r["build_s"] for r in runs if r.get("build_s") is not None]
        val = [r["val_s"] / settings[r["protocol"]]["val"] for r in runs if r.get("val_s")]
        test = [r["test_s"] / settings[r["protocol"]]["test"] for r in runs if r.get("test_s")]
        index = [r["index_s"] for r in runs if r.get("index_s")]
        build_s = statistics.median(build) if build else 0.0
        val_s = min(val) * n_val if val else 0.0
        test_s = min(test) * n_test if test else val_s * n_test / max(1, n_val)
        index_s = statistics.median(index) if index else 0.0
        rows[m.name] = _row(m, seeds, build_s, step_s, val_s, test_s, index_s, f"{len(runs)} runs", None)
    return rows


def makespan(times: list[float], workers: int) -> float:
    """Wall time of ``times`` taken in order by ``workers`` processes, each taking the next when free."""
    free = [0.0] * max(1, workers)
    for t in times:
        i = free.index(min(free))
        free[i] += t
    return max(free)


def project(rows: list[dict], task: str, per_epoch: int, steps_total: int, timing_reps: int, workers: int) -> dict:
    """The projected wall time for ``steps_total`` steps per run and for 1, 2, 3 epochs."""
    timing_s = (max(0, timing_reps) * sum(r["step_s"] for r in rows) + sum(r["build_s"] for r in rows)
                if timing_reps > 2 else 0.0)

    def total(steps: int, ext: bool) -> float:
        per_method = [r["fixed_s"] + r["runs"] * steps * r["step_s"]
                      + (r["ext_fixed_s"] + steps * r["step_s"] if ext and r["runs"] else 0) for r in rows]
        return timing_s + makespan(per_method, workers)

    return {"task": task, "rows": rows, "steps_per_epoch": per_epoch, "steps_total": steps_total,
            "workers": workers, "timing_s": timing_s, "total_s": total(steps_total, False),
            "total_ext_s": total(steps_total, True),
            "by_epochs": {e: (total(e * per_epoch, False), total(e * per_epoch, True)) for e in (1, 2, 3)},
            "load": max((r["load"] for r in rows if r["load"] is not None), default=None)}


def estimate_markdown(est: dict) -> str:
    load = (f"machine load average up to {est['load']:.1f} while measuring" if est["load"] is not None
            else "every method from finished runs")
    lines = [f"Projected wall time, {est['task']}: {est['steps_total']} steps per run "
             f"({est['steps_per_epoch']} per epoch), {est['workers']} worker process(es); {load}.", "",
             "| method | runs | from | build s | step ms | s per epoch | val scoring s | test scoring s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in est["rows"]:
        lines.append(f"| {r['method']} | {r['runs']} (+1) | {r['from']} | {r['build_s']:.1f} | "
                     f"{1e3 * r['step_s']:.0f} | {r['step_s'] * est['steps_per_epoch']:.0f} | {r['val_s']:.0f} | "
                     f"{r['test_s']:.0f} |")
    lines += ["", "from: *N runs* = the finished runs of a comparable protocol in the results file (seconds per "
              "step of whole runs); *N steps* = timed just now on N batches (optimistic: see estimate.py).",
              "", f"Interleaved timing pass: {est['timing_s'] / 60:.1f} min.",
              f"**Projected total: {est['total_s'] / 3600:.2f} h** ({est['total_ext_s'] / 3600:.2f} h if every "
              "method needs its extra lr past a grid end).",
              "By epochs: " + "; ".join(f"{e}: {a / 3600:.2f} h ({b / 3600:.2f} h)"
                                        for e, (a, b) in est["by_epochs"].items()) + "."]
    return "\n".join(lines) + "\n"
