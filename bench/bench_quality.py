"""Quality of NeuroAda against LoRA, PEFT Super-Tuning, head-only and full fine-tuning on a real model.

The command-line entry point; the benchmark lives in ``bench/quality/`` (its ``__init__`` says what
is measured and how). Every method trains with the step that ships in ``train-sparse``
(``neuroada_tools.train.steps``).

    .venv/bin/python bench/bench_quality.py [--quick] [--tasks boolq,arc] [--methods a,b]
        [--out BENCH.md] [--json results.json] [--threads 2] [--task-procs] [--no-memory]
        [--timing-reps N] [--timing-only] [--render results.json ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: the quality package

from quality.measure import evaluate, gradient_share, interleaved_step_ms, memory_probe, train_run  # noqa: E402
from quality.methods import Budget, Context, Method, build_method, methods_for  # noqa: E402
from quality.report import markdown, merge_results  # noqa: E402
from quality.run import main, run_method  # noqa: E402
from quality.tasks import FULL, QUICK, TaskData, TaskSettings, boolq_question, load_task, train_batches  # noqa: E402

__all__ = [
    "FULL", "QUICK", "Budget", "Context", "Method", "TaskData", "TaskSettings", "boolq_question", "build_method",
    "evaluate", "gradient_share", "interleaved_step_ms", "load_task", "main", "markdown", "memory_probe",
    "merge_results", "methods_for", "run_method", "train_batches", "train_run",
]

if __name__ == "__main__":
    sys.exit(main())
