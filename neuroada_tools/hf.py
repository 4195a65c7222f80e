"""Tasks and the transformers model classes that serve them.

``causal-lm`` (decoders: ``AutoModelForCausalLM``), ``classification``
(``AutoModelForSequenceClassification``, a dense head trained beside the deltas) and
``multiple-choice`` (``AutoModelForMultipleChoice``, encoders). Models load from local folders
only, never with ``trust_remote_code`` unless the caller passes it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from neuroada_tools.errors import ModelError

TASKS = ("causal-lm", "classification", "multiple-choice")


def is_encoder(config: dict) -> bool:
    """True for BERT-like encoders (model types transformers has a masked-LM class for)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.get("model_type") in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.get("is_decoder")


def default_task(config: dict) -> str:
    """The task a folder's own architecture implies, else by encoder/decoder."""
    for arch in config.get("architectures") or []:
        if arch.endswith("ForSequenceClassification"):
            return "classification"
        if arch.endswith("ForMultipleChoice"):
            return "multiple-choice"
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal-lm"
    return "classification" if is_encoder(config) else "causal-lm"


def auto_class(task: str):
    import transformers

    if task not in TASKS:
        raise ModelError(f"unknown task {task!r} (choose {', '.join(TASKS)})")
    return {
        "causal-lm": transformers.AutoModelForCausalLM,
        "classification": transformers.AutoModelForSequenceClassification,
        "multiple-choice": transformers.AutoModelForMultipleChoice,
    }[task]


def task_config(model_dir: Path, task: str, *, num_labels: int | None = None,
                label_names: list[str] | None = None, trust_remote_code: bool = False):
    """The transformers config of ``model_dir``, adjusted for ``task`` (labels for classification)."""
    import transformers

    try:
        cfg = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True,
                                                      trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many kinds; the message is what matters
        raise ModelError(f"{model_dir}: cannot read config.json ({_first_line(e)})") from None
    if task == "classification":
        if label_names:
            cfg.num_labels = len(label_names)
            cfg.id2label = dict(enumerate(label_names))
            cfg.label2id = {n: i for i, n in enumerate(label_names)}
        elif num_labels:
            cfg.num_labels = num_labels
        cfg.problem_type = "single_label_classification"
    return cfg


def load_model(model_dir: Path, task: str, *, config=None, dtype: torch.dtype | None = None,
               trust_remote_code: bool = False) -> torch.nn.Module:
    """Load ``model_dir`` for ``task`` with transformers (local files only)."""
    import transformers

    cls = auto_class(task)
    cfg = config if config is not None else task_config(model_dir, task, trust_remote_code=trust_remote_code)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls.from_pretrained(str(model_dir), config=cfg, local_files_only=True,
                                        trust_remote_code=trust_remote_code, use_safetensors=True,
                                        # a retrained head may have another label count than the folder's
                                        ignore_mismatched_sizes=task != "causal-lm",
                                        dtype=dtype if dtype is not None else "auto")
    except Exception as e:
        raise ModelError(f"{model_dir}: cannot load as {task} model ({_first_line(e)})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model


def meta_parameter_names(config, task: str) -> list[str]:
    """State-dict parameter names of the ``task`` model for ``config``, built on the meta device."""
    import transformers

    cls = auto_class(task)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = cls.from_config(config)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return list(model.state_dict().keys())


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
