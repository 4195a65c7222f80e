"""Quantized frozen bases (QLoRA-style): the bypass over a Linear layer whose weight it cannot write.

A quantized layer (bitsandbytes ``Linear4bit`` nf4/fp4 or ``Linear8bitLt``, or an ``nn.Linear``
whose weight torchao's ``quantize_`` replaced by a quantized tensor) stores codes and scales, not
``W``: the fused path's in-place refresh has nothing to write into. Its bypass therefore computes

    y = layer(x) + x S^T,     S[i, idx[i, j]] = delta[i, j], 0 elsewhere,

with ``layer(x)`` the quantized layer's own forward (its dequantizing matmul, bias included) and
``x S^T`` the sparse term of ``kernels/sparse_add.py`` (the same op FSDP2's ``sparse`` mode uses):
``grad_x`` gets ``g S`` from it and ``g dequant(W)`` from the layer, ``grad_delta = sddmm(g, x, idx)``
in fp32. The weight is never read by the bypass, so no dequantized copy is ever made, and
``W0_sel`` is not kept (the buffer is ``[d_out, 0]``). Unquantized layers of the same model keep
the fused path. Deltas, a task head and their AdamW state are fp32 as always.

Worked example (d_out=2, d_in=3, k=1): a quantized layer that dequantizes to
``W~ = [[1, 2, 3], [4, 5, 6]]``, ``idx = [[2], [0]]``, ``delta = [[0.5], [-1]]``, ``x = [1, 1, 1]``:
``layer(x) = [6, 15]`` and ``x S^T = [0.5, -1]``, so ``y = [6.5, 14]``, the fp32 bypass over
``W~``. Merging writes ``W + S`` into the full-precision checkpoint (``W``, not ``W~``): the merged
model differs from the trained one by the quantization error only (``logit_shift`` measures it).

Selection and binding stay with the full-precision checkpoint: the index is built from the
safetensors, and ``check.binding.verify_loaded`` fingerprints a quantized layer's tensor from the
checkpoint file, never from dequantized values (they would not match, and are not the base).

``QUANTIZATIONS``: ``nf4`` / ``fp4`` (bitsandbytes ``Linear4bit``, blocks of 64, compute in the
loaded dtype), ``int8`` (bitsandbytes ``Linear8bitLt``: LLM.int8(), int8 weights with per-row
scales, no outlier threshold), ``torchao-int8`` (torchao ``Int8WeightOnlyConfig``) and ``torchao-int4`` (torchao
``Int4WeightOnlyConfig``; needs a device its int4 kernels support). ``quantize_model`` replaces
every ``nn.Linear`` inside the base model (not the task head or LM head, which stay dense, as
QLoRA leaves them) and checks first, on a small layer, that the scheme runs forward and backward
on the model's device. bitsandbytes' 4-bit keeps its defaults otherwise, double quantization of
the absmax included (QLoRA's). Left out: quantized Conv1D (GPT-2: its layers stay dense and
fused), loading straight into quantized form (the base is loaded, then quantized, so
the peak is the loaded model's), and merging into a quantized checkpoint.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from collections.abc import Iterable

import torch
from torch import nn

from neuroada_tools.errors import QuantizationError

#: scheme -> (library import name, pip distribution)
QUANTIZATIONS = {
    "nf4": ("bitsandbytes", "bitsandbytes"),
    "fp4": ("bitsandbytes", "bitsandbytes"),
    "int8": ("bitsandbytes", "bitsandbytes"),
    "torchao-int8": ("torchao", "torchao"),
    "torchao-int4": ("torchao", "torchao"),
}
EXTRA = "quant"


def require(scheme: str):
    """The library module ``scheme`` needs; ``QuantizationError`` naming the extra when it is missing."""
    if scheme not in QUANTIZATIONS:
        raise QuantizationError(f"unknown quantization {scheme!r}: expected one of {', '.join(QUANTIZATIONS)}")
    lib, dist = QUANTIZATIONS[scheme]
    try:
        return importlib.import_module(lib)
    except Exception as e:  # noqa: BLE001 - ImportError, or a library that fails to initialise
        raise QuantizationError(
            f"--quantize {scheme} needs {dist}, which is not installed or fails to import "
            f"({type(e).__name__}); pip install 'neuroada-tools[{EXTRA}]'"
        ) from None


def scheme_of(module: nn.Module) -> str | None:
    """The quantization of a Linear layer (``"nf4"``, ``"int8"``, ``"torchao-int8"`` ...) or None.

    Libraries are looked at only when already imported, so a model without them costs nothing."""
    own = module.__dict__.get("_neuroada_base_cls", type(module))
    bnb = sys.modules.get("bitsandbytes")
    if bnb is not None:
        if issubclass(own, bnb.nn.Linear4bit):
            return str(getattr(module.weight, "quant_type", "nf4"))
        if issubclass(own, bnb.nn.Linear8bitLt):
            return "int8"
    if "torchao" in sys.modules and issubclass(own, nn.Linear):
        w = module.__dict__.get("_parameters", {}).get("weight")
        if w is not None and type(w).__module__.startswith("torchao"):
            name = type(w).__name__.lower()
            return "torchao-int4" if "int4" in name else "torchao-int8"
    return None


def logical_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a quantized Linear (its stored weight may be packed)."""
    return int(module.out_features), int(module.in_features)


def library_version(scheme: str) -> str:
    dist = QUANTIZATIONS[scheme][1]
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - imported but not installed
        return "unknown"


def _convert(linear: nn.Linear, scheme: str, device: torch.device) -> nn.Module:
    """A quantized copy of ``linear`` on ``device`` (bitsandbytes: a new module; torchao: in place)."""
    lib = require(scheme)
    w = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if scheme in ("nf4", "fp4"):
        q = lib.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias is not None,
                              compute_dtype=w.dtype if w.dtype != torch.float16 else torch.float32,
                              quant_type=scheme, device="meta")
        q.weight = lib.nn.Params4bit(w.to("cpu").contiguous(), requires_grad=False, quant_type=scheme)
    elif scheme == "int8":
        q = lib.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias is not None,
                                has_fp16_weights=False, threshold=0.0, device="meta")
        q.weight = lib.nn.Int8Params(w.to("cpu").contiguous(), requires_grad=False, has_fp16_weights=False)
    else:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        config = Int8WeightOnlyConfig() if scheme == "torchao-int8" else Int4WeightOnlyConfig()
        linear.to(device)
        wrap = nn.Sequential(linear)
        quantize_(wrap, config)
        return wrap[0]
    if bias is not None:
        q.bias = nn.Parameter(bias.to("cpu"), requires_grad=False)
    return q.to(device)  # bitsandbytes quantizes here


def probe(scheme: str, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
    """Quantize a 128x128 Linear on ``device`` and run forward and backward through it;
    ``QuantizationError`` (one line, naming scheme and device) when that fails. Works under
    ``torch.no_grad()`` too (the backward runs with grad enabled)."""
    require(scheme)
    try:
        g = torch.Generator().manual_seed(0)
        lin = nn.Linear(128, 128, bias=True, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(128, 128, generator=g) * 0.05)
        q = _convert(lin, scheme, device)
        for p in q.parameters():
            p.requires_grad_(False)
        x = torch.randn(2, 128, generator=g, dtype=dtype).to(device).requires_grad_(True)
        with torch.enable_grad():  # the caller may be under no_grad
            q(x).float().sum().backward()
        if x.grad is None or not bool(torch.isfinite(x.grad).all()):
            raise RuntimeError("backward gave no finite input gradient")
    except QuantizationError:
        raise
    except Exception as e:  # noqa: BLE001 - every library failure becomes one line
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QuantizationError(f"--quantize {scheme} cannot run on {device} ({dtype}): {why[:200]}") from None


def quantizable(model: nn.Module, skip: Iterable[str] = ()) -> list[str]:
    """Names of the plain ``nn.Linear`` modules inside the base model (``base_model_prefix``), minus
    ``skip`` and any module under them; the LM head and task heads lie outside and stay dense."""
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    root = f"{prefix}." if isinstance(inner, nn.Module) and inner is not model else ""
    skip = tuple(skip)
    out = []
    for name, m in model.named_modules():
        if type(m) is not nn.Linear or not name.startswith(root):
            continue
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        out.append(name)
    return out


def quantize_model(model: nn.Module, scheme: str, *, device: torch.device | str = "cpu",
                   skip: Iterable[str] = ()) -> list[str]:
    """Replace every plain ``nn.Linear`` of the base model by its ``scheme`` quantization on ``device``;
    return their names. The model is moved to ``device`` first.

    Raises ``QuantizationError`` when the library is missing (naming the ``quant`` extra), when the
    scheme cannot run on ``device`` (``probe``), or when the model has no such layer. Nothing is
    changed when it raises. Example: SmolLM2-135M with ``"nf4"`` quantizes its 210 projections
    (30 layers x 7); ``lm_head`` (tied to the embedding) stays fp32.
    """
    device = torch.device(device)
    names = quantizable(model, skip)
    if not names:
        raise QuantizationError(
            f"{type(model).__name__}: no nn.Linear layer to quantize with --quantize {scheme} "
            "(Conv1D layers, as in GPT-2, are not quantized)"
        )
    dtypes = {model.get_submodule(n).weight.dtype for n in names}
    probe(scheme, device, torch.bfloat16 if dtypes == {torch.bfloat16} else torch.float32)
    model.to(device)
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, leaf)
        new = _convert(old, scheme, device)
        for p in new.parameters():
            p.requires_grad_(False)
        setattr(parent, leaf, new)
    return names


def layer_bytes(module: nn.Module) -> int:
    """Bytes a Linear layer holds for its weight and bias, quantization state included (bitsandbytes:
    codes, absmax and its double-quantization state, int8 row scales; torchao: its tensor's inner
    tensors). Example: a 4096x4096 nf4 weight is 8 MiB of codes plus ~0.27 MiB of state, against
    32 MiB in bf16."""
    seen: dict[tuple[int, int], int] = {}

    def add(t) -> None:
        if not torch.is_tensor(t):
            return
        if hasattr(t, "__tensor_flatten__"):
            inner, _ = t.__tensor_flatten__()
            for n in inner:
                add(getattr(t, n))
            return
        seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()

    for name in ("weight", "bias"):
        add(module._parameters.get(name))
    w = module._parameters.get("weight")
    qs = getattr(w, "quant_state", None)
    while qs is not None:  # bitsandbytes 4-bit: absmax and code, then the nested (double-quant) state
        add(getattr(qs, "absmax", None))
        add(getattr(qs, "code", None))
        add(getattr(qs, "offset", None))
        qs = getattr(qs, "state2", None)
    add(getattr(w, "SCB", None))  # bitsandbytes int8: per-row scales
    return sum(seen.values())


@torch.no_grad()
def logit_shift(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    """How far logits ``a`` are from ``b`` (``[..., vocab]``): max abs difference, mean abs
    difference, and the share of positions (``mask`` True, default all) whose argmax agrees.

    Example: ``a = [[1., 3.], [2., 0.]]``, ``b = [[1., 2.], [0., 1.]]`` give ``max_abs 2.0``,
    ``mean_abs 1.0`` and ``argmax_agreement 0.5`` (row 0 agrees, row 1 does not)."""
    a, b = a.float(), b.float()
    if mask is None:
        mask = torch.ones(a.shape[:-1], dtype=torch.bool, device=a.device)
    diff = (a - b).abs()[mask]
    agree = (a.argmax(-1) == b.argmax(-1))[mask]
    return {
        "max_abs": float(diff.max()) if diff.numel() else 0.0,
        "mean_abs": float(diff.mean()) if diff.numel() else 0.0,
        "argmax_agreement": float(agree.float().mean()) if agree.numel() else 1.0,
        "positions": int(agree.numel()),
    }
