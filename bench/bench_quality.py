"""Quality of NeuroAda against LoRA, PEFT Super-Tuning, head-only and full fine-tuning on a real model.

The command-line entry point; the benchmark lives in ``bench/quality/`` (its ``__init__`` says what
is measured and how). Every method trains with the step that ships in ``train-sparse``
(``neuroada_tools.train.steps``).

    .venv/bin/python bench/bench_quality.py [--estimate] [--quick] [--results runs.jsonl] [--out BENCH.md]
        [--tasks arc,boolq] [--methods a,b] [--seeds 3] [--epochs N] [--device cuda] [--threads 2]
        [--render] [--grad-share]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: the quality package

from quality.estimate import from_runs, makespan, measure, project  # noqa: E402
from quality.measure import evaluate, gradient_share, interleaved_step_ms, train_run  # noqa: E402
from quality.methods import REFERENCE, Budget, Calibration, Context, Method, build_method, methods_for  # noqa: E402
from quality.report import markdown  # noqa: E402
from quality.run import main  # noqa: E402
from quality.runs import Store, best, extension, protocol_of, run_method  # noqa: E402
from quality.stats import paired_interval, t_quantile  # noqa: E402
from quality.tasks import (  # noqa: E402
    PROTOCOL,
    QUICK,
    TaskData,
    TaskSettings,
    boolq_question,
    load_task,
    steps_per_epoch,
    train_batches,
)

__all__ = [
    "Budget", "Calibration", "Context", "Method", "PROTOCOL", "QUICK", "REFERENCE", "Store", "TaskData",
    "TaskSettings", "best", "boolq_question", "build_method", "evaluate", "extension", "from_runs", "gradient_share",
    "interleaved_step_ms", "load_task", "main", "makespan", "markdown", "measure", "methods_for", "paired_interval",
    "project", "protocol_of", "run_method", "steps_per_epoch", "t_quantile", "train_batches", "train_run",
]

if __name__ == "__main__":
    sys.exit(main())
