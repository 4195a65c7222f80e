"""``index --criterion gradient``: rank each row's input connections by how hard a calibration
set's loss pulls on them, then keep the top k, as the magnitude criterion does with ``|W|``.

The score of weight ``W[i, j]`` is the sum, over the calibration batches ``b``, of ``|dL_b/dW[i, j]|``,
where ``L_b`` is the loss **sum** over batch ``b`` exactly as ``train-sparse`` computes it
(``train.steps.compute_loss``: the summed token cross-entropy of the response for causal LM, the
summed cross-entropy of the examples for classification and multiple choice) and before it is
divided by any count. The sum matters: an absolute value is taken per batch, so a positive factor
that differed between batches (a per-batch mean divides each batch by its own target count) would
reweight the batches against each other and change the ranking; with sums every target token (or
example) counts the same, and the ranking does not depend on how the examples are batched other
than through which examples share a batch.

The batches are the first ``examples`` examples ``train-sparse`` would train on, in file order (no
shuffling; causal-LM examples with no response token within ``max_length`` are dropped first, as
training drops them), cut into batches of ``batch_size`` (the last one may be smaller). The model
is loaded with transformers in fp32 from the local folder (no remote code unless asked) and run in
eval mode, so dropout adds no noise. A classification head the folder lacks starts from the
initialisation ``train-sparse --seed 0`` gives it (seed 0 in a forked generator: the caller's random
state is left alone).

Worked example. One adapted ``W`` of shape 2 x 3 and two batches with gradients
``g1 = [[1, -2, 0], [0, 0, 3]]`` and ``g2 = [[-1, 1, 4], [2, 0, -3]]``: the score is
``|g1| + |g2| = [[2, 3, 4], [2, 0, 6]]``, so k=1 picks ``[[2], [2]]`` and k=2 ``[[1, 2], [0, 2]]``.
(``|g1 + g2| = [[0, 1, 4], [2, 0, 0]]`` would rank otherwise: the sum of absolute values keeps
connections that two batches push in opposite directions.) Ties go to the lower column.

Memory. Only the adapted weights require gradients (every other parameter is frozen, so it gets
none), and each adapted weight has a hook (``Tensor.register_post_accumulate_grad_hook``) that adds
``|grad|`` into that weight's fp32 accumulator and frees the gradient as soon as autograd has
produced it; the gradients of all matrices are never held at once. Peak: the model's weights
(fp32) + the activations of one batch + one fp32 accumulator per adapted matrix + one transient
gradient (the largest adapted matrix). Then the model is dropped, and the top-k and the base
fingerprints are computed tensor by tensor exactly as for ``magnitude`` (``build._build``: the
accumulators + one read buffer). The activations grow with batch size x length; in a small model
with a large vocabulary the fp32 logits and their gradients are most of them (a random 117 M
Llama, vocab 32000, batch 8 x 128 tokens: peak 1.7 GB over the imports for a 0.45 GB fp32 model;
``bench/bench_gradient_index.py``).

Determinism: on CPU the same inputs give byte-identical sidecars on one machine and thread count
(``tests/test_index_gradient.py``); some CUDA backward kernels are not deterministic.

Left out: gradient checkpointing and bf16 scoring (the bound above is the cost of an fp32 forward
and backward), sampling or shuffling the calibration set, more than one device.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from neuroada_tools.errors import ModelError, TargetError, TrainingError
from neuroada_tools.hf import TASKS, default_task, load_model
from neuroada_tools.index.build import IndexSummary, Progress, _build, plan, summarize
from neuroada_tools.index.targets import Target
from neuroada_tools.io.checkpoint import Checkpoint, open_checkpoint
from neuroada_tools.io.names import match_names
from neuroada_tools.io.outputs import atomic_file, check_output
from neuroada_tools.io.sidecar import file_digest
from neuroada_tools.train.config import TrainConfig
from neuroada_tools.train.data import collate
from neuroada_tools.train.data.prompts import TEMPLATES
from neuroada_tools.train.setup import DataSettings, pick_device, prepare_data, resolve_max_length, task_model_config
from neuroada_tools.train.steps import compute_loss, count_targets

HEAD_SEED = 0  # a fresh classification head starts as train-sparse's default --seed 0 makes it


def _default(name: str):
    return TrainConfig.__dataclass_fields__[name].default


@dataclass(frozen=True)
class Calibration:
    """How ``--criterion gradient`` scores: the data and the ``train-sparse`` settings it shares
    (``batch_size``, ``max_length`` and ``task`` have train-sparse's meanings and defaults)."""

    data: Path
    examples: int = 256
    batch_size: int = _default("batch_size")
    max_length: int | None = None  # default: 256, or the model's positions if fewer (resolve_max_length)
    task: str | None = None  # default: from the config, as train-sparse picks it
    device: str = "auto"
    trust_remote_code: bool = False
    template: str = "alpaca"  # instruction records: the Alpaca prompt, or "chat" (the chat template)

    def check(self) -> None:
        """``TargetError`` naming the setting when a count is < 1 or the task is unknown."""
        for name in ("examples", "batch_size", "max_length"):
            value = getattr(self, name)
            if name == "max_length" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                flag = "calibration-examples" if name == "examples" else name.replace("_", "-")
                raise TargetError(f"--{flag} must be an integer >= 1, found {value!r}")
        if self.template not in TEMPLATES:
            raise TargetError(f"unknown template {self.template!r} (choose {', '.join(TEMPLATES)})")
        if self.task is not None and self.task not in TASKS:
            raise TargetError(f"unknown task {self.task!r} (choose {', '.join(TASKS)})")


@dataclass
class GradientScores:
    """``scores[name]``: fp32 ``sum_b |dL_b/dW|`` in the parameter's (stored) orientation, on CPU."""

    scores: dict[str, torch.Tensor]
    batches: int
    target_count: int  # target tokens (causal LM) or examples the losses summed over
    loss_sum: float


def gradient_scores(
    model: torch.nn.Module,
    params: dict[str, torch.nn.Parameter],
    batches: Iterable[dict[str, torch.Tensor]],
    task: str,
    device: torch.device,
    on_batch: Callable[[int], None] | None = None,
) -> GradientScores:
    """``sum over batches of |d(loss sum)/dW|`` for every ``W`` in ``params`` (see the module docstring).

    Puts ``model`` in eval mode and freezes every parameter that is not in ``params`` (they stay
    frozen afterwards; ``params`` are left requiring gradients). ``on_batch(n)`` is called after
    each batch of ``n`` examples. Raises ``TrainingError`` when a batch's loss is NaN or infinite.

    Example: for a model whose only adapted weight is ``lin.weight``,
    ``gradient_scores(model, {"lin.weight": model.lin.weight}, [b1, b2], "classification", cpu)``
    returns ``scores["lin.weight"] == |grad of b1's loss sum| + |grad of b2's loss sum|``.
    """
    model.eval()
    wanted = {id(p) for p in params.values()}
    for p in model.parameters():
        if id(p) not in wanted:
            p.requires_grad_(False)
    accumulators: dict[int, torch.Tensor] = {}
    handles = []
    for p in params.values():
        if id(p) in accumulators:  # one weight reached under two names: one accumulator, one hook
            continue
        acc = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        accumulators[id(p)] = acc
        p.requires_grad_(True)
        p.grad = None
        handles.append(p.register_post_accumulate_grad_hook(_accumulate_into(acc)))
    loss_sum, count, n_batches, seen = 0.0, 0, 0, 0
    try:
        for batch in batches:
            loss, _ = compute_loss(model, batch, task, device)
            size = int(batch["labels"].shape[0])
            if not bool(torch.isfinite(loss)):
                raise TrainingError(
                    f"calibration batch {n_batches + 1} (examples {seen + 1}..{seen + size}): "
                    "the loss is NaN or infinite"
                )
            loss.backward()
            loss_sum += float(loss.detach())
            count += count_targets(batch, task)
            n_batches += 1
            seen += size
            if on_batch:
                on_batch(size)
    finally:
        for h in handles:
            h.remove()
        for p in params.values():
            p.grad = None
    scores = {name: accumulators[id(p)].cpu() for name, p in params.items()}
    return GradientScores(scores, n_batches, count, loss_sum)


def _accumulate_into(acc: torch.Tensor) -> Callable[[torch.Tensor], None]:
    """The post-accumulate hook of one weight: ``acc += |grad|``, then free the gradient."""

    def hook(p: torch.Tensor) -> None:
        g = p.grad
        if g is not None:
            acc.add_(g.abs_())  # autograd handed this gradient to .grad alone: safe to change in place
            p.grad = None

    return hook


def calibration_batches(examples: list[dict], batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches of ``examples`` in order: ``[0, bs)``, ``[bs, 2 bs)``, ... (the last may be smaller)."""
    for s in range(0, len(examples), batch_size):
        yield collate(examples[s : s + batch_size], pad_id)


def run_gradient_index(
    model: Path | str,
    k: int,
    output: Path | str,
    calibration: Calibration,
    *,
    force: bool = False,
    include=(),
    exclude=(),
    clip_k: bool = False,
    progress_total: Callable[[int], None] | None = None,
    progress: Progress | None = None,
) -> IndexSummary:
    """Score the targets of ``model`` on ``calibration.data``, write the per-row top-k index to ``output``.

    In order: the output path, the targets and k, the task and ``max_length``, then the data
    (every bad record is a ``DataError`` naming the file and line, before any model is loaded),
    then the model and the calibration passes (``progress_total(examples)``, ``progress(n)`` per
    batch of ``n`` examples), then the index, written atomically. Raises ``OutputError``,
    ``TargetError``, ``CheckpointError``, ``ModelError``, ``DataError``, ``TrainingError``.
    """
    started = time.perf_counter()
    calibration.check()
    output, data = Path(output), Path(calibration.data)
    ckpt = open_checkpoint(model)
    model_dir = _model_folder(model, ckpt)
    check_output(output, force, inputs=list(ckpt.files) + [ckpt.root / "config.json", data])
    targets, ks, clipped = plan(ckpt, k, include=include, exclude=exclude, clip_k=clip_k)
    config = ckpt.config or {}
    task = calibration.task or default_task(config)
    max_length = resolve_max_length(calibration.max_length, config, model_dir)

    settings = DataSettings(data=data, max_length=max_length, trust_remote_code=calibration.trust_remote_code,
                            template=calibration.template)
    prep = prepare_data(settings, task, model_dir)  # DataError before any model is loaded
    examples = prep.examples[: calibration.examples]
    data_sha = file_digest(data)
    device = pick_device(calibration.device)

    tcfg = task_model_config(model_dir, task, prep, trust_remote_code=calibration.trust_remote_code)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(HEAD_SEED)
        net = load_model(model_dir, task, config=tcfg, dtype=torch.float32,
                         trust_remote_code=calibration.trust_remote_code)
    net.to(device)
    params = _target_parameters(net, targets, model_dir)
    if progress_total:
        progress_total(len(examples))
    result = gradient_scores(net, params, calibration_batches(examples, calibration.batch_size, prep.pad_id),
                             task, device, on_batch=progress)
    del net, params

    meta = {
        "batch_size": calibration.batch_size,
        "data_sha256": data_sha,
        "examples": len(examples),
        "max_length": max_length,
        "task": task,
    }
    with atomic_file(output) as tmp:
        index = _build(ckpt, targets, ks, k, "gradient", None, output=tmp, scores=result.scores, calibration=meta)
    return summarize(
        output, index, ckpt, targets, ks, clipped, started,
        calibration={
            **meta,
            "target_count": result.target_count,
            "mean_loss": result.loss_sum / max(result.target_count, 1),
            "device": str(device),
            "template": calibration.template,  # not in the sidecar's neuroada.calibration (its keys are fixed)
        },
    )


def _model_folder(model: Path | str, ckpt: Checkpoint) -> Path:
    """The folder transformers loads: the checkpoint's own, which must hold exactly these weights."""
    root = ckpt.root
    if not (root / "config.json").is_file():
        raise ModelError(
            f"{root}: --criterion gradient loads the model with transformers and needs its folder "
            "(config.json, weights, tokenizer); no config.json there"
        )
    if not Path(model).is_dir() and sorted(open_checkpoint(root).files) != sorted(ckpt.files):
        raise ModelError(
            f"{model}: is not the checkpoint transformers loads from {root}; give the model folder instead"
        )
    return root


def _target_parameters(net: torch.nn.Module, targets: list[Target], model_dir: Path) -> dict[str, torch.nn.Parameter]:
    """``{checkpoint name: parameter}`` for every target (``match_names``: ``encoder.layer.0...``
    finds ``bert.encoder.layer.0...``); ``ModelError`` naming a target the model lacks or stores
    with another shape."""
    named = dict(net.named_parameters())
    mapping = match_names([t.name for t in targets], list(named))
    out: dict[str, torch.nn.Parameter] = {}
    for t in targets:
        if t.name not in mapping:
            raise ModelError(f"{model_dir}: the loaded {type(net).__name__} has no parameter for {t.name!r}")
        p = named[mapping[t.name]]
        stored = (t.d_in, t.d_out) if t.transposed else (t.d_out, t.d_in)
        if tuple(p.shape) != stored:
            raise ModelError(
                f"{model_dir}: {t.name!r} loads with shape {list(p.shape)}, the checkpoint stores {list(stored)}"
            )
        out[t.name] = p
    return out
