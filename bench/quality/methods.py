"""The methods the quality benchmark compares, built on the same pretrained model with matched
budgets: NeuroAda (the shipped ``attach``; magnitude, gradient or random selection), LoRA and
Super-Tuning (``peft``), head-only and full fine-tuning.
"""

from __future__ import annotations

import gc
import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from quality.tasks import TASK_KIND

LLM_TARGET_REGEX = r".*layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"  # llm.py's targets

TARGET_REGEX = (
    r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)"
)
REFERENCE = "neuroada-k4-magnitude"  # the method every other is compared with, seed by seed (encoder tasks)


def reference_of(task: str) -> str:
    """The reference of the paired differences of ``task``."""
    from quality import llm

    return llm.REFERENCE if task in llm.LLM_TASKS else REFERENCE


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # neuroada | lora | supertuning | head | full
    k: int = 0  # NeuroAda budget this method is matched to
    lrs: tuple[float, ...] = ()
    criterion: str = "magnitude"  # neuroada: magnitude | gradient | random (drawn with the run's seed)


# One grid per method family (the three NeuroAda criteria share theirs; each picks its own lr).
NEUROADA_GRID = (2e-3, 6e-3, 2e-2)
LORA_GRID = (1e-3, 3e-3, 1e-2)
HEAD_GRID = (1e-3, 3e-3, 1e-2)
FULL_GRID = (2e-5, 6e-5, 2e-4)


def methods_for(quick: bool, task: str | None = None) -> tuple[list[Method], list[Method]]:
    """``(the protocol's methods, extra methods --methods may name)``, with their lr grids
    (``quick``: the upper two lrs of each); the LLM task's are ``llm.methods``."""
    from quality import llm

    if task in llm.LLM_TASKS:
        return llm.methods(quick)
    main = [
        Method("neuroada-k4-magnitude", "neuroada", 4, NEUROADA_GRID, "magnitude"),
        Method("neuroada-k4-gradient", "neuroada", 4, NEUROADA_GRID, "gradient"),
        Method("neuroada-k4-random", "neuroada", 4, NEUROADA_GRID, "random"),
        Method("lora-k4", "lora", 4, LORA_GRID),
        Method("supertuning-k4", "supertuning", 4, NEUROADA_GRID),
        Method("full", "full", 0, FULL_GRID),
        Method("head", "head", 0, HEAD_GRID),
    ]
    extra = [
        Method("neuroada-k1-magnitude", "neuroada", 1, (3e-3, 1e-2, 3e-2)),
        Method("neuroada-k16-magnitude", "neuroada", 16, (1e-3, 3e-3, 1e-2)),
        Method("lora-k1", "lora", 1, LORA_GRID),
        Method("lora-k16", "lora", 16, (3e-4, 1e-3, 3e-3)),
        Method("supertuning-k1", "supertuning", 1, (3e-3, 1e-2, 3e-2)),
        Method("supertuning-k16", "supertuning", 16, (1e-3, 3e-3, 1e-2)),
    ]
    if quick:  # two lrs each: exercises the pick without the cost
        main, extra = ([Method(m.name, m.kind, m.k, m.lrs[1:], m.criterion) for m in ms] for ms in (main, extra))
    return main, extra


@dataclass
class Budget:
    """Per-model counts the matched budgets are derived from."""

    sum_dout: int
    sum_din_dout: int
    sum_numel: int
    n_targets: int

    def lora_r(self, k: int) -> int:
        return max(1, round(k * self.sum_dout / self.sum_din_dout))

    def supertuning_sparsity(self, k: int) -> float:
        return 1.0 - k * self.sum_dout / self.sum_numel


@dataclass(frozen=True)
class Calibration:
    """What the gradient criterion calibrates on: the first training records, as trained on."""

    task: str
    records: tuple  # JSON-able records (``tasks.bench_records``)
    max_length: int
    batch: int


class Context:
    """Model folder, tokenizer, device, cached indices and the budget counts."""

    def __init__(self, model_dir: Path, device: str = "cpu"):
        from transformers import AutoTokenizer

        self.model_dir = model_dir
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self._index: dict[tuple, object] = {}
        self.calibration: dict[str, Calibration] = {}
        self.index_seconds: dict[tuple, float] = {}
        idx = self.index(1)
        shapes = [tuple(idx.entries[n].shape) for n in sorted(idx.indices)]
        self.targets = sorted(idx.indices)
        self.budget = Budget(
            sum_dout=sum(d for d, _ in shapes), sum_din_dout=sum(d + i for d, i in shapes),
            sum_numel=sum(d * i for d, i in shapes), n_targets=len(shapes),
        )

    def index(self, k: int, criterion: str = "magnitude", seed: int = 0, task: str | None = None):
        """The NeuroAda index: ``build_index`` (magnitude; random with ``seed``) or, for ``gradient``,
        ``run_gradient_index`` (the library function behind ``index --criterion gradient``) on
        ``self.calibration[task]``, written to a temporary file and read back."""
        import time

        key = (k, criterion, seed if criterion == "random" else 0, task if criterion == "gradient" else None)
        if key not in self._index:
            t0 = time.perf_counter()
            if criterion == "gradient":
                self._index[key] = self._gradient_index(k, self.calibration[task])
            else:
                from neuroada_tools.index.build import build_index

                self._index[key] = build_index(self.model_dir, k, criterion=criterion,
                                               seed=seed if criterion == "random" else None)
            self.index_seconds[key] = time.perf_counter() - t0
        return self._index[key]

    def _gradient_index(self, k: int, cal: Calibration):
        from neuroada_tools.index.gradient import Calibration as LibCalibration
        from neuroada_tools.index.gradient import run_gradient_index
        from neuroada_tools.io.sidecar import read_index

        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "calibration.json"
            data.write_text(json.dumps(list(cal.records)))
            out = Path(tmp) / "gradient.index.safetensors"
            run_gradient_index(self.model_dir, k, out, LibCalibration(
                data=data, examples=len(cal.records), batch_size=cal.batch, max_length=cal.max_length,
                task=TASK_KIND[cal.task], device=self.device))
            return read_index(out)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id or 0)


def _load(ctx: Context, task: str):
    from neuroada_tools.hf import load_model, task_config

    kind = TASK_KIND[task]
    cfg = task_config(ctx.model_dir, kind, num_labels=2 if task == "boolq" else None)
    if kind == "causal-lm":
        cfg.use_cache = False
    return load_model(ctx.model_dir, kind, config=cfg)


def tensor_digest(tensors) -> str:
    """sha256 (first 16 hex) of the tensors' bytes, in order: equal digests, equal values."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def build_method(ctx: Context, task: str, method: Method, seed: int):
    """``(model to call, trainable parameters, info)`` for ``method``, seeded with ``seed``: torch is
    seeded before the model is loaded, so the task head of a seed is the same for every method
    (``info["head_sha"]``)."""
    import torch

    torch.manual_seed(seed)
    raw = _load(ctx, task).to(ctx.device)
    prefix = raw.base_model_prefix + "."
    causal = TASK_KIND[task] == "causal-lm"  # no task head: the LM head is the pretrained one (tied on SmolLM2)
    head = [] if causal else [p for n, p in raw.named_parameters() if not n.startswith(prefix)]
    info: dict = {"head_sha": tensor_digest(head)}
    model = raw
    if method.kind == "zero-shot":
        for p in raw.parameters():
            p.requires_grad_(False)
    elif method.kind == "full":
        for p in raw.parameters():
            p.requires_grad_(True)
    elif method.kind == "head":
        for p in raw.parameters():
            p.requires_grad_(False)
    elif method.kind == "neuroada":
        from neuroada_tools.train.bypass import attach

        index = ctx.index(method.k, method.criterion, seed, task)
        deltas = attach(raw, index)
        info["adapted"] = len(deltas)
        info["index_sha"] = tensor_digest(index.indices[n] for n in sorted(index.indices))
    elif method.kind in ("lora", "supertuning"):
        import peft

        if method.kind == "lora":
            r = ctx.budget.lora_r(method.k)
            cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, bias="none",
                                  target_modules=LLM_TARGET_REGEX if causal else TARGET_REGEX)
            info["r"] = r
        else:
            sp = ctx.budget.supertuning_sparsity(method.k)
            cfg = peft.SupertuningConfig(target_modules=LLM_TARGET_REGEX if causal else TARGET_REGEX, sparsity=sp)
            info["sparsity"] = sp
        model = peft.get_peft_model(raw, cfg)
        adapted = [n for n, m in model.named_modules()
                   if hasattr(m, "base_layer") and not hasattr(m.base_layer, "base_layer")]
        info["adapted"] = len(adapted)
        want = {t.removesuffix(".weight") for t in ctx.targets}  # NeuroAda's targets, checkpoint names
        if len(adapted) != len(want) or not all(any(a == w or a.endswith("." + w) for a in adapted) for w in want):
            raise SystemExit(f"{method.name}: peft adapted other modules than NeuroAda's index")
    else:
        raise ValueError(method.kind)
    if method.kind not in ("full", "zero-shot"):
        for p in head:
            p.requires_grad_(True)
    if method.kind in ("neuroada", "lora", "supertuning") and info["adapted"] != ctx.budget.n_targets:
        raise SystemExit(f"{method.name}: adapted {info['adapted']} modules, expected {ctx.budget.n_targets}")
    params = [p for p in model.parameters() if p.requires_grad]
    info["trainable"] = sum(p.numel() for p in params)
    info["head"] = sum(p.numel() for p in head)
    info["base_total"] = sum(p.numel() for n, p in raw.named_parameters()
                             if "neuroada_delta" not in n and "lora_" not in n and "supertuning_" not in n)
    return model, params, info


def release(model) -> None:
    del model
    gc.collect()
