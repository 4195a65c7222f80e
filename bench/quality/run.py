"""The quality benchmark's runs: the learning-rate sweep of one method, and the command line
(one process, one process per task, the timing-only and gradient-share passes, the memory probe
in a child process)."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import quality
from quality.measure import (
    evaluate,
    gradient_share,
    interleaved_step_ms,
    memory_probe,
    train_run,
)
from quality.methods import Context, Method, build_method, methods_for, release
from quality.report import finish, merge_results
from quality.tasks import (
    FULL,
    QUICK,
    ROOT,
    SEEDS,
    TASK_KIND,
    TaskData,
    TaskSettings,
    default_data,
    default_model,
    load_task,
)

ENTRY = ROOT / "bench" / "bench_quality.py"  # what child processes run


def setup_torch(threads: int):
    import torch

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return torch


def log_line(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def run_probe_child(args, task: str, method: Method, lr: float) -> dict:
    """``memory_probe`` in a fresh process (so the peak RSS is its own)."""
    cmd = [sys.executable, str(ENTRY), "--_probe", json.dumps({"task": task, "method": method.name, "lr": lr}),
           "--threads", str(args.threads), "--model", str(args.model), "--data", str(args.data)]
    if args.quick:
        cmd.append("--quick")
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_method(ctx: Context, data: TaskData, task: str, s: TaskSettings, method: Method) -> dict:
    """The lr sweep on the dev slice (seed 0; one extra lr past an end of the grid once), then
    seeds 1 and 2 at the picked lr; all three scored on the test set."""
    res: dict = {"method": method.name, "kind": method.kind, "k": method.k, "lrs": list(method.lrs),
                 "lrs_planned": list(method.lrs), "sweep": []}
    kept = {}
    grid = list(method.lrs)
    extended = False
    while grid:
        lr = grid.pop(0)
        t0 = time.time()
        model, params, info = build_method(ctx, task, method, SEEDS[0])
        tr = train_run(ctx, model, params, data, task, s, lr, SEEDS[0])
        dev = (evaluate(ctx, model, data.dev, task, s.eval_batch) if not tr["diverged"]
               else {"acc": -1.0, "loss": float("inf")})
        res["info"] = info
        res["sweep"].append({"lr": lr, "dev_acc": dev["acc"], "dev_loss": dev["loss"], "diverged": tr["diverged"],
                             "loss_last": tr["loss_last"], "seconds": time.time() - t0})
        kept[lr] = (model, tr)
        log_line(f"  {task} {method.name} lr={lr:.3g} dev acc {dev['acc']:.4f} loss {dev['loss']:.4f}"
                 f" ({time.time() - t0:.0f}s, median step {1e3 * statistics.median(tr['step_s'] or [0]):.0f} ms)")
        if not grid and not extended and len(method.lrs) > 2:
            # the pick at an end of the grid: try one more point beyond that end (once), same ratio
            extended = True
            lrs = sorted(method.lrs)
            pick = max(res["sweep"], key=lambda r: (r["dev_acc"], -r["dev_loss"]))["lr"]
            if pick == lrs[-1]:
                grid.append(lrs[-1] * lrs[-1] / lrs[-2])
            elif pick == lrs[0]:
                grid.append(lrs[0] * lrs[0] / lrs[1])
    best = max(res["sweep"], key=lambda r: (r["dev_acc"], -r["dev_loss"]))
    lr = best["lr"]
    res["lrs"] = sorted(x["lr"] for x in res["sweep"])
    res["lr"] = lr
    for other in list(kept):
        if other != lr:
            release(kept.pop(other)[0])
    seeds = []
    step_s: list[float] = []
    for seed in SEEDS:
        t0 = time.time()
        if seed == SEEDS[0]:
            model, tr = kept.pop(lr)
        else:
            model, params, _ = build_method(ctx, task, method, seed)
            tr = train_run(ctx, model, params, data, task, s, lr, seed)
        test = (evaluate(ctx, model, data.test, task, s.eval_batch) if not tr["diverged"]
                else {"acc": float("nan"), "loss": float("inf")})
        release(model)
        step_s += tr["step_s"]
        seeds.append({"seed": seed, "test_acc": test["acc"], "test_loss": test["loss"], "diverged": tr["diverged"]})
        log_line(f"  {task} {method.name} lr={lr:.3g} seed {seed}: test acc {test['acc']:.4f} "
                 f"({time.time() - t0:.0f}s)")
    accs = [r["test_acc"] for r in seeds]
    res["seeds"] = seeds
    res["test_mean"] = statistics.mean(accs)
    res["test_std"] = statistics.stdev(accs) if len(accs) > 1 else 0.0
    res["step_ms"] = 1e3 * statistics.median(step_s) if step_s else float("nan")
    return res


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=quality.__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny slices, few steps, 2 lrs")
    ap.add_argument("--tasks", default="boolq,arc", help="comma list of boolq, arc")
    ap.add_argument("--methods", default=None, help="comma list of method names (default: all)")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown tables here")
    ap.add_argument("--json", type=Path, default=None,
                    help="write all results as JSON here (updated after each method)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: all-MiniLM-L6-v2)")
    ap.add_argument("--data", type=Path, default=None, help="data folder (default: $NEUROADA_DATA or ../shared/data)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    ap.add_argument("--steps", type=int, default=None, help="override the training steps of every task")
    ap.add_argument("--task-procs", action="store_true",
                    help="run each task in its own child process with threads/len(tasks) threads each, then merge: "
                         "on a shared machine two 1-thread processes lose far less to a busy neighbour than one "
                         "2-thread process (whose threads wait on each other)")
    ap.add_argument("--render", type=Path, nargs="+", default=None,
                    help="only render the markdown of these --json files")
    ap.add_argument("--timing-reps", type=int, default=None,
                    help="repetitions of the interleaved step-time pass after each task "
                         "(default 12, --quick 4; <3: skip)")
    ap.add_argument("--grad-share", action="store_true",
                    help="only the gradient-share diagnostic: how much of the task gradient each support can hold")
    ap.add_argument("--timing-only", action="store_true",
                    help="only the interleaved step-time pass (with --json: writes it; with --render: merged in)")
    ap.add_argument("--_probe", default=None, help=argparse.SUPPRESS)
    return ap, ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ap, args = parse_args(argv)
    args.model = args.model or default_model()
    args.data = args.data or default_data()
    torch = setup_torch(args.threads)
    settings = dict(QUICK if args.quick else FULL)
    if args.steps is not None:
        settings = {t: TaskSettings(**{**asdict(v), "steps": args.steps}) for t, v in settings.items()}
    all_methods = {m.name: m for m in methods_for(args.quick)}

    if args._probe:
        spec = json.loads(args._probe)
        ctx = Context(args.model)
        data = load_task(spec["task"], args.data, ctx.tokenizer, settings[spec["task"]], with_test=False)
        probe = memory_probe(ctx, data, spec["task"], all_methods[spec["method"]], settings[spec["task"]], spec["lr"])
        print(json.dumps(probe))
        return 0

    if args.timing_reps is None:
        args.timing_reps = 4 if args.quick else 12
    if args.render:
        return finish(merge_results([json.loads(p.read_text()) for p in args.render]), args)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        if t not in TASK_KIND:
            ap.error(f"unknown task {t!r} (choose from {', '.join(TASK_KIND)})")
    names = [n.strip() for n in args.methods.split(",")] if args.methods else list(all_methods)
    for n in names:
        if n not in all_methods:
            ap.error(f"unknown method {n!r} (choose from {', '.join(all_methods)})")
    methods = [all_methods[n] for n in names]
    command = ("python bench/bench_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()

    t_start = time.time()
    if args.task_procs and len(tasks) > 1:
        return _task_processes(args, tasks, command, t_start)
    ctx = Context(args.model)
    log_line(f"model {args.model}; {ctx.budget.n_targets} target matrices; threads {args.threads}")
    if args.grad_share:
        return _grad_share(args, ctx, tasks, settings, command)
    if args.timing_only:
        return _timing_only(args, ctx, tasks, methods, settings, command)
    results: dict = {
        "command": command, "quick": args.quick, "threads": args.threads, "model": str(args.model),
        "torch": torch.__version__, "budget": asdict(ctx.budget), "settings": {t: asdict(settings[t]) for t in tasks},
        "tasks": {},
    }
    try:
        import peft

        results["peft"] = peft.__version__
    except ImportError:
        results["peft"] = None
    for task in tasks:
        _run_task(args, ctx, task, settings[task], methods, results, t_start)
    results["elapsed_s"] = time.time() - t_start
    return finish(results, args)


def _run_task(args, ctx: Context, task: str, s: TaskSettings, methods: list[Method], results: dict,
              t_start: float) -> None:
    data = load_task(task, args.data, ctx.tokenizer, s)
    log_line(f"{task}: {data.note}")
    tres = {"note": data.note, "methods": {}}
    results["tasks"][task] = tres
    for m in methods:
        t0 = time.time()
        r = run_method(ctx, data, task, s, m)
        if not args.no_memory and (not args.quick or m is methods[0]):  # quick: exercise the probe once
            r["memory"] = run_probe_child(args, task, m, r["lr"])
        r["seconds"] = time.time() - t0
        tres["methods"][m.name] = r
        mem = r.get("memory", {}).get("peak_delta_mib", float("nan"))
        log_line(f"{task} {m.name}: test {100 * r['test_mean']:.2f} ± {100 * r['test_std']:.2f} at lr {r['lr']:.3g}; "
                 f"{r['info']['trainable']:,} trainable; {r['step_ms']:.0f} ms/step; peak +{mem:.0f} MiB "
                 f"({r['seconds']:.0f}s, total {time.time() - t_start:.0f}s)")
        results["elapsed_s"] = time.time() - t_start
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    if args.timing_reps > 2:
        t0 = time.time()
        tres["timing_ms"] = interleaved_step_ms(ctx, data, task, methods, s, args.timing_reps)
        tres["timing_reps"] = args.timing_reps
        log_line(f"{task} interleaved step ms: " + ", ".join(f"{n} {v:.0f}" for n, v in tres["timing_ms"].items())
                 + f" ({time.time() - t0:.0f}s)")
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))


def _task_processes(args, tasks: list[str], command: str, t_start: float) -> int:
    import tempfile

    threads = max(1, args.threads // len(tasks))
    with tempfile.TemporaryDirectory() as tmp:
        procs, outs = [], []
        for t in tasks:
            # per-task JSON beside --json (kept: partial results survive an interrupted run)
            out = args.json.with_name(f"{args.json.stem}.{t}.json") if args.json else Path(tmp) / f"{t}.json"
            cmd = [sys.executable, str(ENTRY), "--tasks", t, "--json", str(out), "--threads", str(threads),
                   "--model", str(args.model), "--data", str(args.data)]
            cmd += ["--quick"] if args.quick else []
            cmd += ["--no-memory"] if args.no_memory else []
            cmd += ["--methods", args.methods] if args.methods else []
            cmd += ["--steps", str(args.steps)] if args.steps is not None else []
            cmd += ["--timing-reps", str(args.timing_reps)]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=None))
            outs.append(out)
        codes = [p.wait() for p in procs]
        parts = [json.loads(o.read_text()) for o in outs if o.exists()]
    if not parts:
        raise SystemExit(f"every task process failed (exit codes {codes})")
    results = merge_results(parts)
    results["command"] = command
    results["threads"] = f"{args.threads} (one process per task, {threads} thread each)"
    results["elapsed_s"] = time.time() - t_start
    if any(codes):
        results["incomplete"] = f"task process exit codes {codes}"
    return finish(results, args)


def _grad_share(args, ctx: Context, tasks: list[str], settings: dict, command: str) -> int:
    shares = {}
    lines = ["| task | k | share on NeuroAda's support (top-k abs W per row) | k random inputs per row (expected) "
             "| best rank-r update (r) | k largest abs grad per row |", "|---|---|---|---|---|---|"]
    for task in tasks:
        data = load_task(task, args.data, ctx.tokenizer, settings[task], with_test=False)
        shares[task] = gradient_share(ctx, data, task, settings[task])
        for k, v in shares[task].items():
            lines.append(f"| {task} | {k} | {100 * v['neuroada_support']:.2f}% | {100 * v['random_support']:.2f}% | "
                         f"{100 * v['best_rank_r']:.1f}% (r={v['r']}) | {100 * v['topk_grad_per_row']:.1f}% |")
    print("\n".join(lines), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"command": command, "grad_share": shares}, indent=1))
    return 0


def _timing_only(args, ctx: Context, tasks: list[str], methods: list[Method], settings: dict, command: str) -> int:
    timing = {"command": command, "threads": args.threads, "timing": {}}
    reps = max(3, args.timing_reps)
    for task in tasks:
        data = load_task(task, args.data, ctx.tokenizer, settings[task])
        t0 = time.time()
        timing["timing"][task] = {"timing_ms": interleaved_step_ms(ctx, data, task, methods, settings[task], reps),
                                  "timing_reps": reps}
        log_line(f"{task} interleaved step ms: {timing['timing'][task]} ({time.time() - t0:.0f}s)")
    print(json.dumps(timing), flush=True)
    if args.json:
        args.json.write_text(json.dumps(timing, indent=1))
    return 0
