"""The exact half of ONNX parity: every adapted weight is in the graph with the bits the merge must write.

Why: ONNX Runtime's kernels sum in another order than torch's, so the logit comparison of an ONNX
graph can only be held to the model's own fp32 noise (``parity.calibrated_tolerance``). On a 30-layer
LLM that noise is ~1e-3 at logit scale 35, and one delta entry of a trained k=1 delta moved to a
wrong column shifts the logits by 1e-3 to 0.2 (``BENCHMARKS.md``, Parity): some such defects hide
under the noise. The weights themselves have no noise. So, independently of ``export/``:

* expected, per adapted weight: ``cast(fp32(W) + scatter(delta))`` in the merged dtype
  (``rounding.reference_value``, from the bypass's own index and delta), and its fp32 upcast (a graph
  exported with ``--onnx-dtype fp32`` holds low-precision weights upcast);
* found: the float initializers of the graph, external data included;
* a weight passes when one initializer holds exactly its bits, as stored or transposed (the dynamo
  exporter stores ``W^T`` for a ``MatMul`` and renames it, e.g. ``val_76``), matched by SHA-256 of
  the raw bytes with dtype and shape.

Worked example: a merged q_proj ``[576, 576]`` fp32 whose graph initializer ``val_76`` is its
transpose passes; the same graph with one value of ``val_76`` changed by one ulp fails, naming
``model.layers.0.self_attn.q_proj.weight``.

What it leaves out: weights that are not adapted (they are the base's; the logit check covers
them), graphs whose builder repacks or quantizes weights (fused QKV, int4): there nothing matches and
the check says so instead of passing.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from neuroada_tools.check.rounding import _adapted, reference_value
from neuroada_tools.errors import ModelError


def _key(array: np.ndarray) -> tuple[str, tuple[int, ...], str]:
    data = np.ascontiguousarray(array)
    return str(data.dtype), tuple(data.shape), hashlib.sha256(data.tobytes()).hexdigest()


def graph_weight_keys(onnx_path: Path) -> set[tuple[str, tuple[int, ...], str]]:
    """``(dtype, shape, sha256)`` of every floating-point initializer of a graph (external data read)."""
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(onnx_path), load_external_data=True)
    except Exception as e:  # onnx raises DecodeError, OSError, ...
        raise ModelError(f"{onnx_path}: cannot read the graph's weights: {str(e).strip().splitlines()[0]}") from e
    keys = set()
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype.kind == "f" and array.ndim == 2:
            keys.add(_key(array))
    return keys


def _torch_keys(t: torch.Tensor) -> set[tuple[str, tuple[int, ...], str]]:
    out = set()
    for v in (t, t.to(torch.float32)):
        if v.dtype == torch.bfloat16:
            continue  # numpy has no bf16; the fp32 upcast covers a graph that upcast it
        for w in (v, v.t()):
            out.add(_key(w.detach().cpu().contiguous().numpy()))
    return out


def check_onnx_weights(unmerged: nn.Module, onnx_paths: list[Path], dtype: torch.dtype) -> dict:
    """Match every adapted weight of ``unmerged`` (bypass attached), merged to ``dtype``, in each graph.

    Returns ``{"tensors": M x graphs, "matched": n, "missing": [first few "graph: name"], "passed": n == M x graphs}``.
    """
    adapted = _adapted(unmerged)
    params = dict(unmerged.named_parameters())
    expected = {name: _torch_keys(reference_value(params[name], dtype, module).to(dtype))
                for name, module in adapted.items()}
    missing = []
    for path in onnx_paths:
        found = graph_weight_keys(Path(path))
        missing += [f"{Path(path).name}: {name}" for name, keys in expected.items() if not keys & found]
        del found
    total = len(adapted) * len(onnx_paths)
    return {"tensors": total, "matched": total - len(missing), "missing": missing[:3], "passed": not missing}


def human(weights: dict) -> str:
    """One line: how many adapted weights the graph holds bit for bit."""
    status = "ok" if weights["passed"] else "FAILED"
    miss = f"; not found: {', '.join(weights['missing'])}" if weights["missing"] else ""
    counts = f"{weights['matched']} of {weights['tensors']}"
    return f"  onnx_weights           {counts} adapted weights bit for bit{miss}  {status}"
