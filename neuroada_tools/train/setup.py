"""Before the first step: tokenized data, the device, the trainable head, the optimizer.

Every bad record is a ``DataError`` naming the file and line, raised by ``prepare_data`` before
the model is even loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neuroada_tools.errors import DataError, ModelError
from neuroada_tools.hf import load_tokenizer, task_config
from neuroada_tools.train.config import TrainConfig
from neuroada_tools.train.data import (
    BuildStats,
    build_causal_lm_examples,
    build_classification_examples,
    build_multiple_choice_examples,
    read_records,
)
from neuroada_tools.train.steps import has_target


@dataclass
class DataSettings:
    """What ``prepare_data`` reads of a run's settings, for callers without a ``TrainConfig``
    (``index --criterion gradient``); a ``TrainConfig`` has the same fields and is accepted as is."""

    data: Path
    max_length: int
    eval_data: Path | None = None
    label_field: str | None = None
    text_field: str | None = None
    num_labels: int | None = None
    train_on_prompt: bool = False
    trust_remote_code: bool = False
    template: str = "alpaca"


@dataclass
class PreparedData:
    """The tokenized training (and eval) examples of a run and what the loop needs to know of them."""

    examples: list[dict]
    eval_examples: list[dict] | None
    label_field: str | None
    label_names: list[str] | None
    stats: BuildStats
    skipped: int  # causal LM: examples whose target was cut away by max_length
    pad_id: int
    tokenizer: object


def resolve_max_length(max_length: int | None, config: dict[str, Any], model_dir: Path) -> int:
    """The ``--max-length`` a run uses: ``min(256, the model's positions)`` when not given (``config.json``
    ``max_position_embeddings`` or ``n_positions``; 256 when neither is known); a given value longer
    than the model's positions is refused (``ModelError``). Example: GPT-2 (1024 positions) and no
    ``--max-length`` give 256; a model with 64 positions gives 64; ``--max-length 65`` there is refused."""
    positions = config.get("max_position_embeddings") or config.get("n_positions")
    known = isinstance(positions, int) and not isinstance(positions, bool) and positions > 0
    if max_length is None:
        return min(256, positions) if known else 256
    if known and max_length > positions:
        raise ModelError(
            f"--max-length {max_length} is longer than the model's {positions} positions "
            f"({Path(model_dir) / 'config.json'}); use --max-length {positions} or less"
        )
    return max_length


def prepare_data(cfg: TrainConfig | DataSettings, task: str, model_dir: Path) -> PreparedData:
    """Load the tokenizer, read and tokenize ``cfg.data`` (and ``cfg.eval_data``) for ``task``."""
    tokenizer = load_tokenizer(model_dir, cfg.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ModelError(f"{model_dir}: the tokenizer has neither a pad nor an eos token")
    label_field = cfg.label_field
    records = read_records(cfg.data)
    if task == "classification" and label_field is None:
        first = records[0]
        label_field = "answer" if "instruction" in first and "label" not in first else "label"
    examples, label_names, build_stats = build_examples(task, records, tokenizer, cfg, label_field, None)
    eval_examples = None
    if cfg.eval_data is not None:
        eval_records = read_records(cfg.eval_data)
        eval_examples, _, _ = build_examples(task, eval_records, tokenizer, cfg, label_field, label_names)
    skipped = 0
    if task == "causal-lm":  # no target left after truncation: nothing to learn, NaN mean loss
        kept = [ex for ex in examples if has_target(ex)]
        skipped = len(examples) - len(kept)
        examples = kept
        if eval_examples is not None:
            eval_examples = [ex for ex in eval_examples if has_target(ex)]
            if not eval_examples:
                raise DataError(
                    f"{cfg.eval_data}: no example keeps a response token within --max-length {cfg.max_length}")
        if not examples:
            raise DataError(f"{cfg.data}: no example keeps a response token within --max-length {cfg.max_length}")
    return PreparedData(examples, eval_examples, label_field, label_names, build_stats, skipped, pad_id, tokenizer)


def task_model_config(model_dir: Path, task: str, prep: PreparedData, trust_remote_code: bool = False):
    """The transformers config ``train-sparse`` loads ``model_dir`` with for ``task``: the data's
    label names (classification), and for a decoder used as a classifier (GPT-2) the pad token,
    by which it finds the last token of each row."""
    tcfg = task_config(model_dir, task, label_names=prep.label_names, trust_remote_code=trust_remote_code)
    if getattr(tcfg, "pad_token_id", None) is None and task != "causal-lm":
        tcfg.pad_token_id = prep.pad_id
    return tcfg


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Activation (gradient) checkpointing, non-reentrant; ``ModelError`` if the model lacks it."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ModelError(f"{type(model).__name__} does not support gradient checkpointing")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_examples(task, records, tokenizer, cfg: TrainConfig | DataSettings, label_field, label_names):
    """``(examples, label names or None, BuildStats)`` for ``task``; DataError names file and line."""
    if task == "causal-lm":
        built = build_causal_lm_examples(
            records, tokenizer, max_length=cfg.max_length, train_on_prompt=cfg.train_on_prompt,
            template=cfg.template,
        )
        return list(built), None, built.stats
    if task == "classification":
        built, names = build_classification_examples(
            records,
            tokenizer,
            max_length=cfg.max_length,
            label_field=label_field,
            text_field=cfg.text_field,
            num_labels=cfg.num_labels if label_names is None else None,
            label_names=label_names,
        )
        return list(built), names, built.stats
    built = build_multiple_choice_examples(records, tokenizer, max_length=cfg.max_length)
    return list(built), None, built.stats


def pick_device(name: str) -> torch.device:
    """``auto`` (cuda if available), ``cpu``, ``cuda``, ``cuda:N``; ``ModelError`` if unavailable."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {name!r} asked for, but CUDA is not available")
    return device


def unfreeze_head(model: torch.nn.Module, task: str) -> set[str]:
    """Make the task head trainable (fp32); return its parameter names.

    The head is every parameter outside the base model (``model.base_model_prefix``): for
    ``BertForSequenceClassification`` ``classifier.weight`` and ``classifier.bias``. A causal LM
    trains no head (NeuroAda leaves the LM head frozen). In a bf16 model the head modules are
    made fp32 and their inputs are cast up, so the head and its AdamW state are fp32 too.
    """
    if task == "causal-lm":
        return set()
    prefix = getattr(model, "base_model_prefix", "") + "."
    names = {n for n, _ in model.named_parameters() if not n.startswith(prefix) and "neuroada_delta" not in n}
    if not names:
        raise ModelError(f"{type(model).__name__}: no task head found outside {prefix[:-1]!r}")
    params = dict(model.named_parameters())
    for child in sorted({n.split(".")[0] for n in names}):
        module = getattr(model, child)
        if any("neuroada_delta" in n for n, _ in module.named_parameters()):
            raise ModelError(f"the index adapts a weight of the task head {child!r}; the head is trained densely")
        if any(p.is_floating_point() and p.dtype != torch.float32 for p in module.parameters()):
            module.float()
            module.register_forward_pre_hook(_inputs_to_fp32)
    for n in names:
        params[n].requires_grad_(True)
    return names


def _inputs_to_fp32(module, args):
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
