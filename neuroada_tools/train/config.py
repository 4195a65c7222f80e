"""What a training run takes (``TrainConfig``), what it reports (``TrainSummary``, ``StepInfo``).

Each ``TrainConfig`` field carries its command-line option in its metadata (``option``: the flag,
``help``, and where needed ``min``, ``choices``, ``metavar``), so ``neuroada-tools train-sparse``
builds its options from this one list (``cli/train_sparse.py``) instead of repeating it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from neuroada_tools.errors import TrainingError
from neuroada_tools.hf import TASKS
from neuroada_tools.train.bypass.quant import QUANTIZATIONS
from neuroada_tools.train.data.prompts import TEMPLATES

#: Dtypes the base can be loaded in for training (deltas, head and optimizer state are fp32 always).
TRAIN_DTYPES = ("fp32", "bf16")

#: Settings that shape the trajectory: a resume with any of them changed is refused.
TRAJECTORY = (
    "task", "seed", "lr", "weight_decay", "warmup_ratio", "global_batch", "max_length",
    "max_grad_norm", "train_on_prompt", "dtype", "label_field", "text_field", "num_labels", "template",
    "quantize",
)


def _opt(flag: str, help: str, **extra: Any) -> dict[str, Any]:
    """Field metadata: the command-line option of a ``TrainConfig`` field."""
    return {"option": flag, "help": help, **extra}


@dataclass
class TrainConfig:
    """Everything ``train`` needs; the ``train-sparse`` options map one to one onto these fields."""

    model: Path = field(metadata=_opt("--model", "Base model folder (config.json, safetensors, tokenizer)."))
    index: Path = field(metadata=_opt("--index", "Index sidecar made from this model (neuroada-tools index)."))
    data: Path = field(metadata=_opt(
        "--data", "Training data: JSON list or JSONL of instruction records (instruction, input, output), "
        "{\"text\": ...} records, conversational records ({\"messages\": [{\"role\", \"content\"}, ...]}), "
        "prompt-completion records ({\"prompt\", \"completion\"}: strings or message lists), or classification "
        "records (text + label)."))
    output: Path = field(metadata=_opt(
        "-o/--output", "Delta sidecar to write (*.delta.safetensors); the resume state is written beside it "
        "(NAME.state.safetensors)."))
    task: str | None = field(default=None, metadata=_opt(
        "--task", "Default: from the config (causal-lm for decoders, classification for encoders).", choices=TASKS))
    num_labels: int | None = field(default=None, metadata=_opt(
        "--num-labels", "Classification: number of classes (default: from the data's labels).", min=1))
    label_field: str | None = field(default=None, metadata=_opt(
        "--label-field", "Classification: record field holding the label (default 'label'; 'answer' for "
        "instruction data).", metavar="FIELD"))
    text_field: str | None = field(default=None, metadata=_opt(
        "--text-field", "Classification: record field holding the text (default 'text'; instruction [+ input] "
        "for instruction data).", metavar="FIELD"))
    eval_data: Path | None = field(default=None, metadata=_opt(
        "--eval-data", "Evaluate on this file at the end: loss, and accuracy for classification."))
    lr: float = field(default=7e-4, metadata=_opt(
        "--lr", "Peak learning rate (paper: 7e-4 at k=20, 9e-3 at k=1).", show_default=True))
    weight_decay: float = field(default=0.0, metadata=_opt(
        "--weight-decay", "AdamW weight decay (deltas and head weights).", show_default=True))
    warmup_ratio: float = field(default=0.06, metadata=_opt(
        "--warmup-ratio", "Share of the steps with linear warmup; then linear decay to 0.", show_default=True))
    epochs: int = field(default=3, metadata=_opt(
        "--epochs", "Passes over the data (unless --max-steps).", min=1, show_default=True))
    max_steps: int | None = field(default=None, metadata=_opt(
        "--max-steps", "Optimizer steps to train; overrides --epochs.", min=1))
    batch_size: int = field(default=8, metadata=_opt(
        "--batch-size", "Examples per micro-batch.", min=1, show_default=True))
    grad_accum: int = field(default=1, metadata=_opt(
        "--grad-accum", "Micro-batches per optimizer step.", min=1, show_default=True))
    max_length: int | None = field(default=None, metadata=_opt(
        "--max-length", "Cut longer examples to this many tokens (default: 256, or the model's maximum "
        "positions if fewer).", min=1))
    max_grad_norm: float = field(default=1.0, metadata=_opt(
        "--max-grad-norm", "Clip the gradient norm (0: no clipping).", min=0, show_default=True))
    seed: int = field(default=0, metadata=_opt(
        "--seed", "Seed for data order, head initialisation and dropout.", min=0, show_default=True))
    dtype: str = field(default="fp32", metadata=_opt(
        "--dtype", "Dtype to load the base model in; deltas, head and optimizer state are fp32 always.",
        choices=TRAIN_DTYPES, show_default=True))
    quantize: str | None = field(default=None, metadata=_opt(
        "--quantize", "Train over a quantized frozen base (QLoRA-style; needs the 'quant' extra): nf4 / fp4 "
        "(bitsandbytes 4-bit), int8 (bitsandbytes LLM.int8, int8 weights with per-row scales), torchao-int8 / "
        "torchao-int4 (torchao weight-only). The index and fingerprints come from the full-precision checkpoint, "
        "and merge writes into it.",
        choices=tuple(QUANTIZATIONS)))
    device: str = field(default="auto", metadata=_opt(
        "--device", "auto (cuda if available), cpu, cuda or cuda:N.", show_default=True))
    gradient_checkpointing: bool = field(default=False, metadata=_opt(
        "--gradient-checkpointing", "Recompute activations in backward to save memory."))
    save_every: int = field(default=0, metadata=_opt(
        "--save-every", "Write the delta and resume state every N steps (0: only at the end).", min=0,
        show_default=True))
    resume: bool = field(default=False, metadata=_opt(
        "--resume", "Continue from the resume state beside -o (same data and settings)."))
    train_on_prompt: bool = field(default=False, metadata=_opt(
        "--train-on-prompt", "Causal LM: train on the prompt tokens too (default: response, assistant turns or "
        "completion only)."))
    template: str = field(default="alpaca", metadata=_opt(
        "--template", "Causal LM, instruction records: alpaca (the Alpaca / LLM-Adapters prompt, the paper's) or "
        "chat (a user turn and an assistant turn, rendered with the tokenizer's chat template). Conversational "
        "data always uses the chat template.", choices=TEMPLATES, show_default=True))
    trust_remote_code: bool = field(default=False, metadata=_opt(
        "--trust-remote-code", "Allow the model folder's own Python code (off by default)."))
    force: bool = field(default=False, metadata=_opt(
        "--force", "Overwrite an existing delta sidecar and resume state."))
    fsdp: bool = field(default=False, metadata=_opt(
        "--fsdp", "Under torchrun: shard the model over the processes with FSDP2 (default there: DDP)."))
    dist_timeout: float = field(default=300.0, metadata=_opt(
        "--dist-timeout", "Under torchrun: seconds any collective may wait for the other ranks.", min=1,
        show_default=True))

    def check(self) -> None:
        """Refuse settings no run can use (``TrainingError`` naming the setting)."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise TrainingError(msg)

        need(self.template in TEMPLATES, f"template must be one of {', '.join(TEMPLATES)}, found {self.template!r}")
        need(self.quantize is None or self.quantize in QUANTIZATIONS,
             f"quantize must be one of {', '.join(QUANTIZATIONS)}, found {self.quantize!r}")
        need(self.dtype in TRAIN_DTYPES, f"dtype must be one of {', '.join(TRAIN_DTYPES)}, found {self.dtype!r}")
        need(math.isfinite(self.lr) and self.lr > 0, f"lr must be a positive number, found {self.lr}")
        need(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             f"weight decay must be >= 0, found {self.weight_decay}")
        need(0 <= self.warmup_ratio <= 1, f"warmup ratio must be in [0, 1], found {self.warmup_ratio}")
        need(self.max_grad_norm >= 0, f"max grad norm must be >= 0, found {self.max_grad_norm}")
        need(self.max_length is None or self.max_length >= 1, f"max length must be >= 1, found {self.max_length}")
        need(self.dist_timeout > 0, f"dist timeout must be > 0, found {self.dist_timeout}")
        for name in ("batch_size", "grad_accum", "epochs"):
            need(getattr(self, name) >= 1, f"{name.replace('_', ' ')} must be >= 1, found {getattr(self, name)}")
        need(self.max_steps is None or self.max_steps >= 1, f"max steps must be >= 1, found {self.max_steps}")
        need(self.save_every >= 0, f"save every must be >= 0, found {self.save_every}")
        need(self.seed >= 0, f"seed must be >= 0, found {self.seed}")
        need(not (self.resume and self.force),
             "--resume continues the existing output; it cannot be combined with --force")


@dataclass
class TrainSummary:
    """What a run did; ``to_dict`` is the ``--json`` summary (``losses`` is left out of it)."""

    output: str
    state: str
    sha256: str
    task: str
    steps: int  # optimizer steps done in total (including before a resume)
    start_step: int  # 0, or the step a resumed run started from
    total_steps: int
    epochs: float  # steps / steps per epoch
    examples: int
    skipped_examples: int  # causal LM: examples whose target was cut away by max_length
    truncated_examples: int
    tokens: int  # input tokens processed (padding excluded), in total
    target_tokens: int  # tokens (causal LM) or examples (classification) the loss was taken over
    seconds: float  # wall time of this run's loop
    first_loss: float | None
    last_loss: float | None
    trainable_parameters: int
    delta_parameters: int
    head_parameters: int
    lr: float
    seed: int
    device: str
    dtype: str
    world_size: int = 1  # processes (torchrun); batch_size is per process
    batch_size: int = 0  # per-process micro-batch
    grad_accum: int = 1
    global_batch: int = 0  # batch_size x grad_accum x world_size examples per optimizer step
    base_bytes: int = 0  # bytes of frozen base weights this process holds (FSDP2: its shards)
    label_names: list[str] | None = None
    # --quantize: {"scheme", "library", "version", "layers", "quantized_bytes"}; None over a dense base
    quantization: dict | None = None
    eval: dict | None = None  # {"examples", "loss", "accuracy" (classification, multiple choice)}
    losses: list[float] = field(default_factory=list)  # per step, this run

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["losses"]
        return d


@dataclass
class StepInfo:
    """Passed to the ``on_step`` callback after every optimizer step."""

    step: int
    total_steps: int
    loss: float
    lr: float
