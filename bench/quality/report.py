"""The markdown tables of the quality benchmark, and the merging of several result files."""

from __future__ import annotations

import json
import math
import statistics


def merge_results(parts: list[dict]) -> dict:
    """One result dict from several (one per task process, or several --json files)."""
    runs = [p for p in parts if "tasks" in p]
    out = dict(runs[0])
    out["tasks"], out["settings"] = {}, {}
    for p in runs:
        out["tasks"].update(p["tasks"])
        out["settings"].update(p["settings"])
    for p in parts:  # --timing-only results: the interleaved step times, and the command that made them
        if "timing" in p:
            for task, t in p["timing"].items():
                if task in out["tasks"]:
                    out["tasks"][task].update(t)
            out.setdefault("timing_commands", []).append(p["command"])
    out["elapsed_s"] = max(p.get("elapsed_s", 0) for p in runs)
    return out


def finish(results: dict, args) -> int:
    """Print the markdown; write it to ``--out`` and the results to ``--json``."""
    md = markdown(results)
    print(md, flush=True)
    if args.out:
        args.out.write_text(md)
    if args.json and not args.render:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def _fmt_count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def markdown(results: dict) -> str:
    lines = []
    b = results["budget"]
    lines.append(f"Command: `{results['command']}` (threads {results['threads']}, torch {results['torch']}, "
                 f"peft {results['peft']}); wall time {results.get('elapsed_s', 0) / 60:.0f} min.")
    for c in results.get("timing_commands", []):
        lines.append(f"Interleaved step times: `{c}`.")
    if results.get("incomplete"):
        lines.append(f"**Incomplete run**: {results['incomplete']}.")
    lines.append("")
    for task, tres in results["tasks"].items():
        lines += _task_section(task, tres, results["settings"][task])
    lines.append(f"Budgets: {b['n_targets']} target matrices, sum d_out = {b['sum_dout']:,}, "
                 f"sum d_in*d_out = {b['sum_numel']:,}. Trainable counts include the task head. "
                 "lr+: the extra lr tried because the pick was at an end of the grid; (edge): the chosen lr is "
                 "still at an end of the (extended) grid.")
    return "\n".join(lines) + "\n"


def _task_section(task: str, tres: dict, st: dict) -> list[str]:
    note = tres["note"]
    if task == "boolq":
        head = (f"### BoolQ (question only, 2-way classification): test {note['test']} of {note['test_total']}, "
                f"majority class ('{note['majority_label']}') {100 * note['majority_test']:.2f}% "
                f"({100 * note['majority_test_all']:.2f}% on the whole test split)")
    else:
        head = (f"### ARC-Easy (multiple choice, question + each option): test {note['test']} of "
                f"{note['test_total']}, chance {100 * note['chance_test']:.2f}% "
                f"(options per question: {note['options']})")
    lines = [head, "",
             f"{st['steps']} steps x batch {st['batch']}, max_length {st['max_length']}; train {note['train']}, "
             f"dev (held out of train, picks the lr) {note['dev']}.", ""]
    timing = tres.get("timing_ms", {})
    if task == "boolq":
        p = note["majority_test"]
        prior = -(p * math.log(p) + (1 - p) * math.log(1 - p))
        lines += [f"Test loss of always predicting the class prior: {prior:.4f}.", ""]
    else:
        opts = note["options"]
        prior = sum(n * math.log(int(c)) for c, n in opts.items()) / sum(opts.values())
        lines += [f"Test loss of a uniform guess: {prior:.4f}.", ""]
    lines.append("| method | trainable (share of base) | lr grid | chosen lr | dev acc "
                 "| test acc, mean ± std (3 seeds) | seeds | test loss | step ms, interleaved | step ms, in the runs "
                 "| peak RSS +MiB |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in tres["methods"].items():
        info = r["info"]
        share = 100 * info["trainable"] / info["base_total"]
        extra = f", r={info['r']}" if "r" in info else ""
        best = next(x for x in r["sweep"] if x["lr"] == r["lr"])
        seeds = " / ".join(f"{100 * x['test_acc']:.1f}" for x in r["seeds"])
        planned = len(r.get("lrs_planned", r["sweep"]))  # lr+: tried past an end of the planned grid
        grid = ", ".join(f"{x['lr']:.3g}" + (" (nan)" if x["diverged"] else "") + ("+" if i >= planned else "")
                         for i, x in enumerate(r["sweep"]))
        edge = " (edge)" if len(r["lrs"]) > 2 and r["lr"] in (min(r["lrs"]), max(r["lrs"])) else ""
        mem = r.get("memory", {})
        mem_s = f"{mem['peak_delta_mib']:.0f}" if "peak_delta_mib" in mem else ("n/a" if not mem else "error")
        t_s = f"{timing[name]:.0f}" if name in timing else "n/a"
        lines.append(
            f"| {name}{extra} | {_fmt_count(info['trainable'])} ({share:.3f}%) | {grid} | {r['lr']:.3g}{edge} | "
            f"{100 * best['dev_acc']:.1f} | **{100 * r['test_mean']:.2f} ± {100 * r['test_std']:.2f}** | {seeds} | "
            f"{statistics.mean(x['test_loss'] for x in r['seeds']):.4f} | {t_s} | {r['step_ms']:.0f} | {mem_s} |"
        )
    lines.append("")
    ms = tres["methods"]
    for k in sorted({r["k"] for r in ms.values() if r["k"]}):
        row = {r["kind"]: r for r in ms.values() if r["k"] == k}
        if "neuroada" in row and len(row) > 1:
            na = row["neuroada"]
            diffs = ", ".join(
                f"{kind} {100 * (na['test_mean'] - r['test_mean']):+.2f}"
                for kind, r in row.items() if kind != "neuroada"
            )
            lines.append(f"- k={k}: NeuroAda minus {diffs} points")
    lines.append("")
    return lines
