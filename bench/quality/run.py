"""The quality benchmark's command line: the protocol's runs (resumable through ``--results``),
``--estimate`` (the projected wall time), ``--render`` (the markdown of a results file),
``--grad-share`` (where the task gradient lies) and the interleaved step-time pass."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import quality
from quality import llm, workers
from quality.estimate import estimate_markdown, from_runs, measure, project
from quality.measure import gradient_share, interleaved_step_ms
from quality.methods import Calibration, Context, methods_for, reference_of
from quality.report import markdown
from quality.runs import Store, protocol_of, run_method
from quality.tasks import (
    PROTOCOL,
    QUICK,
    ROOT,
    TASK_KIND,
    default_data,
    default_model,
    load_task,
    steps_per_epoch,
)

DEFAULT_RESULTS = ROOT / ".bench" / "quality-runs.jsonl"


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


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=quality.__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: tiny slices, 4 steps, 2 lrs per method (results in memory unless --results)")
    ap.add_argument("--estimate", action="store_true",
                    help="measure a few steps and the scoring per method and print the projected wall time")
    ap.add_argument("--tasks", default="arc",
                    help="comma list of arc, boolq (default: arc); or arc-llm alone (SmolLM2, quality/llm.py)")
    ap.add_argument("--methods", default=None, help="comma list of method names (default: the protocol's 7)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; --quick 2)")
    ap.add_argument("--epochs", type=int, default=None, help="override the epochs of every task")
    ap.add_argument("--lrs", default=None,
                    help="comma list: the lr grid of every chosen method instead of its family's (an experiment "
                         "beside the protocol: give it its own --results)")
    ap.add_argument("--steps", type=int, default=None, help="override: this many steps per run")
    ap.add_argument("--results", type=Path, default=None,
                    help=f"JSONL of finished runs: appended to, and runs already there are skipped "
                         f"(default {DEFAULT_RESULTS.relative_to(ROOT)}; --quick: none)")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    ap.add_argument("--render", action="store_true", help="only print the markdown of --results")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--workers", type=int, default=None,
                    help="processes the methods are spread over (default: 2 on CPU, 1 on CUDA; see quality/workers.py)")
    ap.add_argument("--model", type=Path, default=None,
                    help="model folder (default: all-MiniLM-L6-v2; arc-llm: SmolLM2-135M-Instruct)")
    ap.add_argument("--data", type=Path, default=None, help="data folder (default: $NEUROADA_DATA or ../shared/data)")
    ap.add_argument("--timing-reps", type=int, default=None,
                    help="repetitions of the interleaved step-time pass after each task (default 12, --quick 4; "
                         "<3: skip)")
    ap.add_argument("--estimate-steps", type=int, default=4, help="--estimate: timed steps per method")
    ap.add_argument("--grad-share", action="store_true",
                    help="only the gradient-share diagnostic: how much of the task gradient each support can hold")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_claims", default=None, help=argparse.SUPPRESS)
    return ap, ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ap, args = parse_args(argv)
    if args.results is None and not args.quick:
        args.results = DEFAULT_RESULTS
    if args.render:
        return _emit(markdown(Store(args.results).records), args)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        if t not in TASK_KIND:
            ap.error(f"unknown task {t!r} (choose from {', '.join(TASK_KIND)})")
    llm_task = any(t in llm.LLM_TASKS for t in tasks)
    if llm_task and len(tasks) > 1:
        ap.error(f"--tasks {args.tasks}: arc-llm runs alone (it has its own model and methods)")
    args.model = args.model or (llm.default_model() if llm_task else default_model())
    args.data = args.data or default_data()
    torch = setup_torch(args.threads)
    if args.device != "cpu" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available")
    main_methods, extra = methods_for(args.quick, tasks[0])
    known = {m.name: m for m in main_methods + extra}
    names = [n.strip() for n in args.methods.split(",")] if args.methods else [m.name for m in main_methods]
    for n in names:
        if n not in known:
            ap.error(f"unknown method {n!r} (choose from {', '.join(known)})")
    methods = [known[n] for n in names]
    if args.lrs:
        try:
            lrs = tuple(sorted({float(x) for x in args.lrs.split(",") if x.strip()}))
        except ValueError:
            ap.error(f"--lrs {args.lrs!r}: not a comma list of numbers")
        if not lrs or min(lrs) <= 0:
            ap.error(f"--lrs {args.lrs!r}: give one or more positive learning rates")
        methods = [replace(m, lrs=lrs) for m in methods]
        if args.results is not None and args.results.resolve() == DEFAULT_RESULTS.resolve():
            ap.error(f"--lrs: give the experiment its own --results (not the protocol's {DEFAULT_RESULTS})")
    if args.seeds is None:
        args.seeds = 2 if args.quick else 3
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    if args.timing_reps is None:
        args.timing_reps = 3 if args.quick else 12
    if args.workers is None:
        args.workers = 1 if args.device != "cpu" or args.grad_share else 2
    settings = {}
    for t in tasks:
        s = (QUICK if args.quick else PROTOCOL)[t]
        if args.epochs is not None:
            s = replace(s, epochs=args.epochs, steps=None)
        if args.steps is not None:
            s = replace(s, steps=args.steps)
        settings[t] = s
    if args.workers > 1 and args._worker is None:
        return workers.parent(args, argv if argv is not None else sys.argv[1:], tasks, methods, settings, log_line)
    return work(args, torch, tasks, methods, settings)


def work(args, torch, tasks, methods, settings) -> int:
    """The runs (or the estimate) of this process: all methods, or those it claims as a worker."""
    store = Store(args.results)
    log = log_line if args._worker is None else (lambda msg: log_line(f"[{args._worker}] {msg}"))
    seeds = list(range(args.seeds))
    ctx = Context(args.model, args.device)
    log(f"model {args.model}; {ctx.budget.n_targets} target matrices; device {args.device}; "
        f"threads {args.threads}; results {args.results or '(in memory)'}"
        + (f" ({len(store.records)} records, {store.bad_lines} unreadable lines)" if args.results else ""))
    if args.grad_share:
        return _grad_share(args, ctx, tasks, settings)
    env = {"device": args.device, "threads": args.threads, "torch": torch.__version__, "peft": _peft_version(),
           "workers": args.workers}
    estimates = []
    for task in tasks:
        s = settings[task]
        data = load_task(task, args.data, ctx.tokenizer, s)
        ctx.calibration[task] = Calibration(task, tuple(data.calibration), s.max_length, s.batch)
        protocol = protocol_of(task, s, data, args.model, args.device)
        log(f"{task}: protocol {protocol['id']}: {protocol['steps_total']} steps x batch {s.batch}; {data.note}")
        mine = (m for m in methods if workers.claim(args, task, m.name))  # lazily: one claim before each method
        if args.estimate:
            past = from_runs(store.records, protocol, methods, seeds, args.threads, len(data.val), len(data.test))
            rows = []
            for m in mine:
                if m.name in past:
                    rows.append(past[m.name])
                    log(f"  {task} {m.name}: from {past[m.name]['from']} in {args.results}: "
                        f"{1e3 * past[m.name]['step_s']:.0f} ms per step")
                else:
                    rows += measure(ctx, data, task, s, [m], seeds, args.estimate_steps, log)
            if args._worker is not None:
                workers.save_estimate(args, task, rows)
            else:
                rows += workers.load_estimate(args, task)
                order = [m.name for m in methods]
                rows.sort(key=lambda r: order.index(r["method"]))
                estimates.append(project(rows, task, steps_per_epoch(len(data.train), s.batch),
                                         protocol["steps_total"], args.timing_reps, args.workers))
            continue
        if store.find(protocol["id"], task, "-", "protocol") is None:
            store.add({"protocol": protocol["id"], "task": task, "method": "-", "phase": "protocol", "seed": None,
                       "lr": None, "settings": protocol, "note": data.note, **env})
        if reference_of(task) not in [m.name for m in methods]:
            log(f"note: {reference_of(task)} is not among the methods; the paired differences need it")
        for m in mine:
            t0 = time.time()
            run_method(ctx, store, data, task, s, m, seeds, protocol, env, log)
            log(f"{task} {m.name}: done ({time.time() - t0:.0f}s)")
        if args._worker is None and args.timing_reps > 2 and len(methods) > 1:
            _timing(ctx, store, data, task, s, methods, protocol, args.timing_reps)
    if args._worker is not None:
        return 0
    return finish(args, estimates if args.estimate else None, store)


def finish(args, estimates, store: Store) -> int:
    """Print the projection (``--estimate``) or the markdown of the results (``store``: this process's
    view of ``--results``, the children's runs included, or its in-memory records without one)."""
    if estimates is not None:
        md = "\n".join(estimate_markdown(e) for e in estimates)
        if len(estimates) > 1:
            md += f"\n**Projected total, all tasks: {sum(e['total_s'] for e in estimates) / 3600:.2f} h**\n"
        return _emit(md, args)
    return _emit(markdown(store.records), args)


def _peft_version():
    try:
        import peft

        return peft.__version__
    except ImportError:
        return None


def _emit(md: str, args) -> int:
    print(md, flush=True)
    if args.out:
        args.out.write_text(md)
    return 0


def _timing(ctx, store, data, task, s, methods, protocol, reps) -> None:
    names = [m.name for m in methods]
    done = store.find(protocol["id"], task, "-", "timing")
    if done is not None and done.get("methods") == names:
        log_line(f"{task} interleaved step times: done before, skipped")
        return
    t0 = time.time()
    ms = interleaved_step_ms(ctx, data, task, methods, s.batch, reps)
    store.add({"protocol": protocol["id"], "task": task, "method": "-", "phase": "timing", "seed": None, "lr": None,
               "methods": names, "reps": reps, "step_ms": ms})
    log_line(f"{task} interleaved step ms: " + ", ".join(f"{n} {v:.0f}" for n, v in ms.items())
             + f" ({time.time() - t0:.0f}s)")


def _grad_share(args, ctx: Context, tasks: list[str], settings: dict) -> int:
    shares = {}
    lines = ["| task | k | share on NeuroAda's support (top-k abs W per row) | k random inputs per row (expected) "
             "| best rank-r update (r) | k largest abs grad per row |", "|---|---|---|---|---|---|"]
    for task in tasks:
        data = load_task(task, args.data, ctx.tokenizer, settings[task], with_test=False)
        shares[task] = gradient_share(ctx, data, task, settings[task].batch)
        for k, v in shares[task].items():
            lines.append(f"| {task} | {k} | {100 * v['neuroada_support']:.2f}% | {100 * v['random_support']:.2f}% | "
                         f"{100 * v['best_rank_r']:.1f}% (r={v['r']}) | {100 * v['topk_grad_per_row']:.1f}% |")
    print("\n".join(lines), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"grad_share": shares, "settings": {t: asdict(settings[t]) for t in tasks}},
                                       indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
