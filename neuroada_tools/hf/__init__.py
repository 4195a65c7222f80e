"""The one place that knows transformers: the task registry, model loading, the dtype table and
quieting its logs. (How a model takes inputs and returns its cache: ``hf/signature.py``.)

Tasks: ``causal-lm`` (decoders: ``AutoModelForCausalLM``), ``classification``
(``AutoModelForSequenceClassification``, a dense head trained beside the deltas) and
``multiple-choice`` (``AutoModelForMultipleChoice``, encoders). Models load from local folders
only, never with ``trust_remote_code`` unless the caller passes it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from neuroada_tools.errors import ModelError

TASKS = ("causal-lm", "classification", "multiple-choice")

#: The dtype names the CLI takes (``--dtype``) and the torch dtypes they mean.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: torch dtype -> CLI name, e.g. ``DTYPE_NAMES[torch.bfloat16] == "bf16"``.
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 500 characters), or its type's name."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:500]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' logs, progress bars and warnings inside the block (library code
    never prints); everything is restored afterwards."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def is_encoder(config: dict) -> bool:
    """True for BERT-like encoders (model types transformers has a masked-LM class for)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.get("model_type") in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.get("is_decoder")


def task_of_architectures(architectures: list[str]) -> str | None:
    """The task an ``architectures`` list names (``LlamaForCausalLM`` -> ``causal-lm``), else None."""
    for arch in architectures:
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal-lm"
        if arch.endswith("ForSequenceClassification"):
            return "classification"
        if arch.endswith("ForMultipleChoice"):
            return "multiple-choice"
    return None


def default_task(config: dict) -> str:
    """The task a folder's own architecture implies, else by encoder/decoder (for training)."""
    task = task_of_architectures(config.get("architectures") or [])
    if task is not None:
        return task
    return "classification" if is_encoder(config) else "causal-lm"


def detect_task(config) -> str:
    """The task of a complete (merged) model from ``config.architectures``; no guessing."""
    archs = list(getattr(config, "architectures", None) or [])
    task = task_of_architectures(archs)
    if task is None:
        raise ModelError(
            f"config.json: cannot tell the task from architectures {archs}; "
            f"expected *ForCausalLM, *ForSequenceClassification or *ForMultipleChoice, or pass task= one of {TASKS}"
        )
    return task


def auto_class(task: str):
    """The transformers auto class that serves ``task``."""
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
        raise ModelError(f"{model_dir}: cannot read config.json ({first_line(e)})") from None
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
    """Load a base ``model_dir`` for training ``task`` (local files only). A classification head
    the folder lacks, or has with another label count, starts fresh: it is trained."""
    cls = auto_class(task)
    cfg = config if config is not None else task_config(model_dir, task, trust_remote_code=trust_remote_code)
    try:
        with quiet_transformers():
            model = cls.from_pretrained(str(model_dir), config=cfg, local_files_only=True,
                                        trust_remote_code=trust_remote_code, use_safetensors=True,
                                        # a retrained head may have another label count than the folder's
                                        ignore_mismatched_sizes=task != "causal-lm",
                                        dtype=dtype if dtype is not None else "auto")
    except Exception as e:
        raise ModelError(f"{model_dir}: cannot load as {task} model ({first_line(e)})") from None
    return model


def load_complete(model_dir: Path, task: str | None = None) -> tuple[torch.nn.Module, str]:
    """Load a complete (merged) model folder in eval mode, refusing one that lacks weights its
    model class needs (they would be random). Returns ``(model, task)``; ``task`` defaults to the
    one ``config.architectures`` names. Local files only, no remote code."""
    import transformers

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir}: not a Hugging Face model folder (no config.json)")
    if task is not None and task not in TASKS:
        raise ModelError(f"task {task!r}: expected one of {TASKS}")
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"{model_dir}/config.json: cannot load: {first_line(e)}") from e
    task = task or detect_task(config)
    auto = auto_class(task)
    try:
        with quiet_transformers():
            model, info = auto.from_pretrained(
                model_dir, dtype="auto", trust_remote_code=False, local_files_only=True, output_loading_info=True
            )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(
            f"{model_dir}: cannot load as {auto.__name__} (transformers {transformers.__version__}, "
            f"model_type {getattr(config, 'model_type', '?')!r}): {first_line(e)}"
        ) from e
    missing = sorted(info.get("missing_keys") or ()) + sorted(str(k) for k in info.get("mismatched_keys") or ())
    if missing:
        # e.g. a bare BertModel loaded for classification: the head would be random, the export garbage
        shown = ", ".join(missing[:4]) + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else "")
        raise ModelError(
            f"{model_dir}: checkpoint lacks weights {type(model).__name__} needs ({shown}); they would be random. "
            f"Export a merged model that contains them"
        )
    model.eval()
    return model, task


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False):
    """The tokenizer of ``model_dir`` (local files only)."""
    import transformers

    try:
        with quiet_transformers():
            return transformers.AutoTokenizer.from_pretrained(
                str(model_dir), local_files_only=True, trust_remote_code=trust_remote_code
            )
    except Exception as e:  # transformers raises many kinds; the message is what matters
        raise ModelError(f"{model_dir}: cannot load the tokenizer ({first_line(e)})") from None


def meta_parameter_names(config, task: str) -> list[str]:
    """State-dict parameter names of the ``task`` model for ``config``, built on the meta device."""
    cls = auto_class(task)
    with quiet_transformers(), torch.device("meta"):
        model = cls.from_config(config)
    return list(model.state_dict().keys())
