"""The methods the quality benchmark compares, built on the same pretrained model with matched
budgets: NeuroAda (the shipped ``attach``), LoRA and Super-Tuning (``peft``), head-only and full.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

from quality.tasks import TASK_KIND

TARGET_REGEX = (
    r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)"
)


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # neuroada | lora | supertuning | head | full
    k: int = 0  # NeuroAda budget this method is matched to
    lrs: tuple[float, ...] = ()


def methods_for(quick: bool) -> list[Method]:
    """Every method with its learning-rate grid (``quick``: the upper two lrs of each)."""
    ms = [
        Method("neuroada-k1", "neuroada", 1, (3e-3, 1e-2, 3e-2)),
        Method("neuroada-k4", "neuroada", 4, (2e-3, 6e-3, 2e-2)),
        Method("neuroada-k16", "neuroada", 16, (1e-3, 3e-3, 1e-2)),
        Method("lora-k1", "lora", 1, (1e-3, 3e-3, 1e-2)),
        Method("lora-k4", "lora", 4, (1e-3, 3e-3, 1e-2)),
        Method("lora-k16", "lora", 16, (1e-3, 3e-3, 1e-2)),
        Method("supertuning-k1", "supertuning", 1, (3e-3, 1e-2, 3e-2)),
        Method("supertuning-k4", "supertuning", 4, (2e-3, 6e-3, 2e-2)),
        Method("supertuning-k16", "supertuning", 16, (1e-3, 3e-3, 1e-2)),
        Method("head", "head", 0, (1e-3, 3e-3, 1e-2)),
        Method("full", "full", 0, (3e-5, 1e-4, 3e-4)),
    ]
    if quick:  # two lrs each: exercises the pick without the cost
        ms = [Method(m.name, m.kind, m.k, m.lrs[1:]) for m in ms]
    return ms


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


class Context:
    """Model folder, tokenizer, cached indices and the budget counts."""

    def __init__(self, model_dir: Path):
        from transformers import AutoTokenizer

        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self._index: dict[int, object] = {}
        idx = self.index(1)
        shapes = [tuple(idx.entries[n].shape) for n in sorted(idx.indices)]
        self.targets = sorted(idx.indices)
        self.budget = Budget(
            sum_dout=sum(d for d, _ in shapes), sum_din_dout=sum(d + i for d, i in shapes),
            sum_numel=sum(d * i for d, i in shapes), n_targets=len(shapes),
        )

    def index(self, k: int):
        if k not in self._index:
            from neuroada_tools.index.build import build_index

            self._index[k] = build_index(self.model_dir, k)
        return self._index[k]

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id or 0)


def _load(ctx: Context, task: str):
    from neuroada_tools.hf import load_model, task_config

    kind = TASK_KIND[task]
    cfg = task_config(ctx.model_dir, kind, num_labels=2 if task == "boolq" else None)
    return load_model(ctx.model_dir, kind, config=cfg)


def build_method(ctx: Context, task: str, method: Method, seed: int):
    """``(model to call, trainable parameters, info)`` for ``method``, seeded with ``seed``."""
    import torch

    torch.manual_seed(seed)
    raw = _load(ctx, task)
    prefix = raw.base_model_prefix + "."
    head = [p for n, p in raw.named_parameters() if not n.startswith(prefix)]
    info: dict = {}
    model = raw
    if method.kind == "full":
        for p in raw.parameters():
            p.requires_grad_(True)
    elif method.kind == "head":
        for p in raw.parameters():
            p.requires_grad_(False)
    elif method.kind == "neuroada":
        from neuroada_tools.train.bypass import attach

        deltas = attach(raw, ctx.index(method.k))
        info["adapted"] = len(deltas)
    elif method.kind in ("lora", "supertuning"):
        import peft

        if method.kind == "lora":
            r = ctx.budget.lora_r(method.k)
            cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGET_REGEX, bias="none")
            info["r"] = r
        else:
            sp = ctx.budget.supertuning_sparsity(method.k)
            cfg = peft.SupertuningConfig(target_modules=TARGET_REGEX, sparsity=sp)
            info["sparsity"] = sp
        model = peft.get_peft_model(raw, cfg)
        adapted = [n for n, m in model.named_modules()
                   if hasattr(m, "base_layer") and not hasattr(m.base_layer, "base_layer")]
        info["adapted"] = len(adapted)
        want = {t.removesuffix(".weight") for t in ctx.targets}  # NeuroAda's targets, checkpoint names
        if {n.split(prefix, 1)[-1] for n in adapted} != want:
            raise SystemExit(f"{method.name}: peft adapted other modules than NeuroAda's index")
    else:
        raise ValueError(method.kind)
    if method.kind != "full":
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
