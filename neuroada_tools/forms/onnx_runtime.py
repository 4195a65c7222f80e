"""ONNX Runtime sessions of exported graphs: open one, feed it torch tensors, read torch tensors back.

``ort_session`` opens a graph on the CPU or CUDA provider (refusing CUDA where onnxruntime lacks it,
and saying so when a bf16 graph cannot run on the CPU provider); ``ort_run`` casts the inputs to the
types the graph declares and returns every output; ``empty_past`` builds the zero-length past of a
with-past graph's prefill. ``onnx_logits`` and ``with_past_session`` open the two decoder graphs
``merge --to onnx`` writes and refuse one whose inputs are not what the runners feed.

What this leaves out: comparing outputs (``check/parity.py``) and decoding (``generate/``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from neuroada_tools.errors import ModelError
from neuroada_tools.hf.signature import past_names

_ORT_INT = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
_ORT_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def ort_session(onnx_path: Path, provider: str = "cpu"):
    """An onnxruntime InferenceSession on "cpu" or "cuda" (CUDA only when asked and available)."""
    import onnxruntime as ort

    onnx_path = Path(onnx_path)
    if provider == "cpu":
        providers = ["CPUExecutionProvider"]
    elif provider == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ModelError(
                f"provider 'cuda' asked for, but onnxruntime {ort.__version__} offers only "
                f"{ort.get_available_providers()} (install onnxruntime-gpu)"
            )
        providers = ["CUDAExecutionProvider"]
    else:
        raise ModelError(f"provider {provider!r}: expected 'cpu' or 'cuda'")
    if not onnx_path.is_file():
        raise ModelError(f"{onnx_path}: no such ONNX file")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(onnx_path), sess_options=opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... classes
        hint = ""
        if provider == "cpu" and "NOT_IMPLEMENTED" in str(e) and _declares_bf16(onnx_path):
            hint = " (a bf16 graph: onnxruntime's CPU provider lacks bf16 kernels; export with dtype='fp32')"
        raise ModelError(f"{onnx_path}: onnxruntime cannot load it: {str(e).strip().splitlines()[0]}{hint}") from e


def _declares_bf16(onnx_path: Path) -> bool:
    import onnx

    try:
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
    except Exception:
        return False
    bf16 = onnx.TensorProto.BFLOAT16
    return any(t.data_type == bf16 for t in graph.initializer) or any(
        v.type.tensor_type.elem_type == bf16 for v in (*graph.input, *graph.output)
    )


def _feed(session, inputs: dict[str, torch.Tensor], where: str) -> dict[str, np.ndarray]:
    feed = {}
    for arg in session.get_inputs():
        if arg.name not in inputs:
            raise ModelError(f"{where}: the graph needs input {arg.name!r}; given {sorted(inputs)}")
        value = inputs[arg.name].detach().cpu()
        if arg.type in _ORT_INT:
            feed[arg.name] = value.numpy().astype(_ORT_INT[arg.type], copy=False)
        elif arg.type in _ORT_FLOAT:
            feed[arg.name] = value.float().numpy().astype(_ORT_FLOAT[arg.type], copy=False)
        else:
            raise ModelError(f"{where}: input {arg.name!r} has type {arg.type}, which this runner cannot feed")
    return feed


def ort_run(session, inputs: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Every output of ``session`` on ``inputs`` (cast to the declared input types), as torch tensors."""
    feed = _feed(session, inputs, where)
    names = [o.name for o in session.get_outputs()]
    try:
        values = session.run(names, feed)
    except Exception as e:
        raise ModelError(f"{where}: onnxruntime failed: {str(e).strip().splitlines()[0]}") from e
    return {n: torch.from_numpy(np.asarray(v)) for n, v in zip(names, values)}


def empty_past(session, past_in: list[str], batch: int, where: str) -> dict[str, torch.Tensor]:
    """Zero-length ``past_key_values.*`` for a prefill through a with-past graph: ``[batch, heads, 0, head_dim]``.

    The graph must declare fixed heads and head_dim (the exporter does); the dtype is cast on feeding.
    """
    empty = {}
    for name, arg in zip(past_in, session.get_inputs()[2:]):
        heads, head_dim = arg.shape[1], arg.shape[3]
        if not isinstance(heads, int) or not isinstance(head_dim, int):
            raise ModelError(f"{where}: input {name!r} has shape {arg.shape}; heads and head_dim must be fixed")
        empty[name] = torch.zeros(batch, heads, 0, head_dim)  # _feed casts to the declared dtype
    return empty


def onnx_logits(path: Path, provider: str = "cpu") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(ids, mask) -> logits [batch, sequence, vocab]`` of a logits-only decoder ``model.onnx``."""
    session = ort_session(path, provider)
    declared = [i.name for i in session.get_inputs()]
    if declared != ["input_ids", "attention_mask"]:
        raise ModelError(f"{path}: expected inputs ['input_ids', 'attention_mask'] of a decoder; found {declared}")

    def run(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = ort_run(session, {"input_ids": ids, "attention_mask": mask}, str(path))
        if "logits" not in out or out["logits"].dim() != 3:
            raise ModelError(f"{path}: expected an output 'logits' [batch, sequence, vocab]; found {sorted(out)}")
        return out["logits"]

    return run


def with_past_session(path: Path, num_layers: int, provider: str = "cpu"):
    """An ONNX Runtime session of a with-past graph, refused unless it takes the past of every layer."""
    session = ort_session(path, provider)
    past_in, _ = past_names(num_layers)
    declared = [i.name for i in session.get_inputs()]
    if declared != ["input_ids", "attention_mask", *past_in]:
        raise ModelError(
            f"{path}: expected inputs input_ids, attention_mask, {past_in[0]}, ... for {num_layers} layers "
            f"(merge --to onnx --with-past writes them); found {declared[:4]}{' ...' if len(declared) > 4 else ''}"
        )
    return session
