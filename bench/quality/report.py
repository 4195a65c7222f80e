"""The markdown of the quality benchmark, rendered from the records of ``--results`` alone."""

from __future__ import annotations

import math
import statistics

from quality.methods import reference_of
from quality.stats import mean_std, paired_interval

TITLE = {"arc": "ARC-Easy (multiple choice, question + each option)",
         "boolq": "BoolQ (question only, 2-way classification)",
         "arc-llm": "ARC-Easy on SmolLM2-135M-Instruct (prompt-completion training, option log-likelihood)"}


def markdown(records: list[dict], only: set[str] | None = None) -> str:
    """One section per protocol found in ``records`` (``only``: these protocol ids)."""
    protocols = list({r["protocol"]: r for r in reversed(records)  # one per id (workers may each write it)
                      if r["phase"] == "protocol" and (only is None or r["protocol"] in only)}.values())[::-1]
    if not protocols:
        return "No finished runs.\n"
    lines: list[str] = []
    for p in protocols:
        lines += _section(p, [r for r in records if r["protocol"] == p["protocol"] and r["phase"] != "protocol"])
    return "\n".join(lines) + "\n"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _fmt_count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def _median(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.median(xs) if xs else None


def _section(p: dict, recs: list[dict]) -> list[str]:
    st, note = p["settings"], p["note"]
    task = st["task"]
    runs = [r for r in recs if r["phase"] in ("sweep", "test")]
    env = runs[0] if runs else {}
    if task in ("arc", "arc-llm"):
        base = f"chance {100 * note['chance_test']:.2f}% (options per question: {note['options']})"
    else:
        base = f"majority class ('{note['majority_label']}') {100 * note['majority_test']:.2f}%"
    whole = "the whole split" if note["test"] == note["test_total"] else f"a fixed subset of {note['test_total']}"
    span = f"{st['epochs']} epoch(s)" if st.get("steps") is None else "fixed steps"
    lines = [f"### {TITLE.get(task, task)}: protocol `{p['protocol']}`", "",
             f"Test {note['test']} questions ({whole}), {base}. Train {note['train']}, validation {note['val']} "
             f"(the last {100 * st['val_frac']:.0f}% of the training file; picks the lr). {span} = "
             f"{st['steps_total']} steps x batch {st['batch']}, max_length {st['max_length']}. Device "
             f"{st['device']}, threads {env.get('threads', '?')}, torch {env.get('torch', '?')}, "
             f"peft {env.get('peft', '?')}."
             + (f" Gradient criterion: calibrated on the first {note['calibration']} training records."
                if note.get("calibration") else ""), ""]
    reference = reference_of(task)
    norm = any(r.get("test_acc_norm") is not None for r in runs)
    methods = list(dict.fromkeys(r["method"] for r in runs))
    tests = {m: {r["seed"]: r for r in runs if r["method"] == m and r["phase"] == "test"} for m in methods}
    ref = {s: r["test_acc"] for s, r in tests.get(reference, {}).items() if r.get("test_acc") is not None}
    lines += ["| method | trainable (share of base) | lr grid: val acc | chosen lr | test acc, mean ± std (seeds) "
              f"| per seed | test loss | minus {reference}, paired (95% t-interval) | step ms | peak +MiB |"
              + (" acc_norm, mean |" if norm else ""),
              "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if norm else "")]
    intervals = {}
    for m in methods:
        sweep = sorted((r for r in runs if r["method"] == m and r["phase"] == "sweep"), key=lambda r: r["lr"])
        t = tests[m]
        if not t:
            lines.append(f"| {m} | | " + ", ".join(f"{r['lr']:.3g}: {_pct(r['val_acc'])}" for r in sweep)
                         + " | (pending) | | | | | | |")
            continue
        first = next(iter(t.values()))
        share = 100 * first["trainable"] / first["base_total"]
        extra = f", r={first['r']}" if first.get("r") else ""
        accs = {s: r["test_acc"] for s, r in t.items() if r.get("test_acc") is not None}
        mean, sd = mean_std(list(accs.values())) if accs else (None, None)
        n_seeds = len(accs)
        seeds = " / ".join(_pct(t[s].get("test_acc")) for s in sorted(t))
        losses = [r["test_loss"] for r in t.values() if r.get("test_loss") is not None]
        planned = {f"{x:.6g}" for x in sweep[0].get("grid", [])} if sweep else set()
        grid = ", ".join(f"{r['lr']:.3g}" + ("+" if planned and f"{r['lr']:.6g}" not in planned else "")
                         + f": {_pct(r['val_acc'])}" + (" (nan)" if r.get("diverged") else "") for r in sweep)
        if first.get("kind") == "zero-shot":
            grid = f"val {_pct(first.get('val_acc'))}"
        lr = first["lr"]
        norms = [r["test_acc_norm"] for r in t.values() if r.get("test_acc_norm") is not None]
        edge = " (edge)" if len(sweep) > 2 and lr in (sweep[0]["lr"], sweep[-1]["lr"]) else ""
        if m == reference:
            diff = "(reference)"
        else:
            if first.get("kind") == "zero-shot" and accs:  # one untrained score, set against every reference seed
                accs = {s: accs[min(accs)] for s in ref}
            iv = paired_interval(accs, ref)
            intervals[m] = iv
            diff = ("n/a" if iv is None else
                    f"{100 * iv['mean']:+.2f} [{100 * iv['lo']:+.2f}, {100 * iv['hi']:+.2f}] (n={len(iv['seeds'])})")
        step = _median(r.get("step_ms") for r in t.values())
        peak = _median(r.get("peak_mib") for r in t.values())
        lines.append(
            f"| {m}{extra} | {_fmt_count(first['trainable'])} ({share:.3f}%) | {grid or '-'} | "
            f"{f'{lr:.3g}' if lr else '-'}{edge} | "
            f"**{_pct(mean)}{f' ± {_pct(sd)}' if n_seeds > 1 else ''}** ({n_seeds}) | {seeds} | "
            f"{(statistics.mean(losses) if losses else float('nan')):.4f} | {diff} | "
            f"{'n/a' if step is None else f'{step:.0f}'} | {'n/a' if peak is None else f'{peak:.0f}'} |"
            + (f" {_pct(statistics.mean(norms)) if norms else 'n/a'} |" if norm else ""))
    lines.append("")
    lines += _notes(runs, tests, intervals, recs, reference)
    return lines


def _notes(runs: list[dict], tests: dict, intervals: dict, recs: list[dict], reference: str) -> list[str]:
    out = []
    ivs = [iv for iv in intervals.values() if iv]
    if ivs:
        df = {iv["df"] for iv in ivs}
        tq = {f"{iv['t']:.3f}" for iv in ivs}
        out.append(f"Paired differences: per seed, the method's test accuracy minus {reference}'s (same batches, head "
                   "initialisation and dropout masks), in points; mean and 95% t-interval over the seeds "
                   f"(degrees of freedom {', '.join(map(str, sorted(df)))}, t = {', '.join(sorted(tq))}). An interval "
                   "that contains 0 does not tell the two methods apart.")
    # the pairing, checked from the records
    by_seed: dict[int, set] = {}
    for r in (r for m in tests.values() for r in m.values() if r.get("kind") != "zero-shot"):  # zero-shot: no batches
        by_seed.setdefault(r["seed"], set()).add((r.get("batches_sha"), r.get("head_sha")))
    bad = sorted(s for s, v in by_seed.items() if len(v) > 1)
    if by_seed:
        out.append("Pairing check (from the records): " + (
            "every method of a seed trained on the same batch order and started from the same head."
            if not bad else f"seeds {bad} differ in batch order or head between methods."))
    step_kind = {r.get("peak_how") for r in runs if r.get("peak_how")}
    out.append("Step ms: median over the test runs of each run's median step (forward, backward, clipping, "
               "AdamW), first 3 steps left out. Peak +MiB: median over the test runs of the rise of "
               f"{' / '.join(sorted(step_kind)) or 'peak memory'} over the training steps (the base weights "
               "not counted).")
    seconds = sum((r.get("train_s") or 0) + (r.get("val_s") or 0) + (r.get("test_s") or 0) + (r.get("build_s") or 0)
                  for r in runs if not r.get("reused_sweep"))
    n_train = sum(1 for r in runs if not r.get("reused_sweep"))
    stamps = sorted(r["time"] for r in runs if r.get("time"))
    span = ""
    if len(stamps) > 1:
        from datetime import datetime

        first, last = (datetime.fromisoformat(x) for x in (stamps[0], stamps[-1]))
        span = f"; {(last - first).total_seconds() / 3600:.2f} h from the first finished run to the last"
    out.append(f"Runs: {n_train} trainings, {seconds / 3600:.2f} h of training and scoring summed over them (worker "
               f"processes run side by side){span}. lr+: the one extra lr past a grid end; (edge): the pick is "
               "still at an end.")
    timing = [r for r in recs if r["phase"] == "timing"]
    if timing:
        t = timing[-1]
        out.append("Step ms interleaved (all methods built side by side, stepped in rotation on the same "
                   f"{t['reps']} batches, median after 2 warm-up): "
                   + ", ".join(f"{m} {v:.0f}" for m, v in t["step_ms"].items()) + ".")
    out.append("")
    return out
