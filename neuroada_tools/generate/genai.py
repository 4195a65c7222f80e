"""The ORT GenAI form: a folder built by onnxruntime-genai's model builder, run by its runtime.

``merge --to onnx`` writes such a folder for the decoder LLMs the builder supports
(``export/genai_build.py``): ``genai_config.json``, ``model.onnx`` + ``model.onnx.data`` (the
decoder with its KV cache), the tokenizer, and ``config.json`` / ``generation_config.json``.
``generate`` and ``check`` run it through ``onnxruntime_genai`` itself -- the runtime a server would
use, its KV cache and GroupQueryAttention included -- not through a re-implementation:

``GenAISession``
    a session for ``decode.generate_ids``: one ``og.Generator`` per prompt (batch 1, so no padding
    question arises), ``append_tokens`` with the prompt, then with each chosen token; the logits are
    the generator's (``get_logits``: the last position's). Our loop chooses the tokens (greedy,
    sampling, EOS), exactly as for the torch and ONNX forms, so the forms are compared on the same
    decisions.
``prompt_logits``
    the logits of every position of each prompt's prefill (``get_output("logits")`` after
    ``append_tokens``): what the logit parity check compares with the unmerged model.
``precision_of``
    the precision the graph computes in, read from ``model.onnx`` (int4: MatMulNBits nodes; fp16 /
    bf16: the type of the ``logits`` output; fp32 otherwise). Parity is enforced on fp32 only.

The KV buffer is not shared between past and present (``past_present_share_buffer=False``): the
cache grows with the sequence instead of being allocated for the whole context (8192 positions for
SmolLM2) per prompt. What this leaves out: og's own search (beam search, its sampling), adapters,
multimodal folders.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from neuroada_tools.errors import ModelError

GENAI_CONFIG = "genai_config.json"
INSTALL_HINT = "pip install 'neuroada-tools[genai]'"


def is_genai_folder(folder: Path | None) -> bool:
    """True for a folder the model builder wrote (it holds ``genai_config.json``)."""
    return folder is not None and (Path(folder) / GENAI_CONFIG).is_file()


def _og():
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        raise ModelError(f"onnxruntime-genai is not installed; it runs ORT GenAI folders ({INSTALL_HINT})") from e
    return og


def precision_of(folder: Path) -> str:
    """``"int4"`` / ``"int8"`` (MatMulNBits), ``"fp16"`` / ``"bf16"`` (the logits' type) or ``"fp32"``."""
    import onnx

    path = Path(folder) / _decoder_file(folder)
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:
        raise ModelError(f"{path}: cannot read the graph: {str(e).strip().splitlines()[0]}") from e
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            return f"int{bits}"
    kinds = {onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}
    logits = next((o for o in graph.output if o.name == "logits"), None)
    return kinds.get(logits.type.tensor_type.elem_type, "fp32") if logits is not None else "fp32"


def _genai_config(folder: Path) -> dict:
    path = Path(folder) / GENAI_CONFIG
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        return cfg if isinstance(cfg, dict) else {}
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: not readable JSON: {e}") from e


def _decoder_file(folder: Path) -> str:
    decoder = _genai_config(folder).get("model", {}).get("decoder", {})
    return str(decoder.get("filename", "model.onnx")) if isinstance(decoder, dict) else "model.onnx"


def context_length(folder: Path) -> int | None:
    value = _genai_config(folder).get("model", {}).get("context_length")
    return value if isinstance(value, int) and value > 0 else None


def load_model(folder: Path, provider: str = "cpu"):
    """An ``og.Model`` on ``provider`` ("cpu" or "cuda"); one line on failure."""
    og = _og()
    folder = Path(folder)
    if not is_genai_folder(folder):
        raise ModelError(f"{folder}: no {GENAI_CONFIG} (build one with: merge --to onnx --exporter genai)")
    if provider not in ("cpu", "cuda"):
        raise ModelError(f"provider {provider!r}: expected 'cpu' or 'cuda'")
    try:
        config = og.Config(str(folder))
        config.clear_providers()
        if provider == "cuda":
            config.append_provider("cuda")
        return og.Model(config)
    except Exception as e:  # og raises RuntimeError with the runtime's message
        raise ModelError(f"{folder}: onnxruntime-genai cannot load it on {provider}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e


def _generator(model, max_length: int | None):
    og = _og()
    params = og.GeneratorParams(model)
    options = {"past_present_share_buffer": False}
    if max_length:
        options["max_length"] = max_length
    params.set_search_options(**options)
    return og.Generator(model, params)


def _append(generator, ids: Sequence[int], where: str) -> None:
    try:
        generator.append_tokens(np.asarray([list(ids)], dtype=np.int32))
    except Exception as e:
        raise ModelError(f"{where}: onnxruntime-genai failed: {str(e).strip().splitlines()[0]}") from e


def _as_torch(value) -> torch.Tensor:
    return torch.from_numpy(np.asarray(value).astype(np.float32, copy=False))


class GenAISession:
    """``decode.Session`` over the ORT GenAI runtime: one generator per prompt, tokens appended by our loop."""

    def __init__(self, model, where: str, max_length: int | None = None):
        self.model, self.where, self.max_length = model, where, max_length
        self.generators: list = []

    def _last(self) -> torch.Tensor:  # stacked in numpy: no torch worker threads competing with the runtime's
        return torch.from_numpy(np.concatenate([np.asarray(g.get_logits(), dtype=np.float32).reshape(1, -1)
                                                for g in self.generators]))

    def first(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        self.generators = []
        for p in prompts:
            g = _generator(self.model, self.max_length)
            _append(g, p, self.where)
            self.generators.append(g)
        return self._last()

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        for g, t in zip(self.generators, tokens.tolist()):
            _append(g, [int(t)], self.where)
        return self._last()


def prompt_logits(model, prompts: Sequence[Sequence[int]], where: str, max_length: int | None = None
                  ) -> list[torch.Tensor]:
    """Per prompt, the logits ``[len(prompt), V]`` of its prefill through the runtime (fp32)."""
    out = []
    for p in prompts:
        g = _generator(model, max_length)
        _append(g, p, where)
        logits = _as_torch(g.get_output("logits"))
        if logits.dim() != 3 or logits.shape[1] != len(p):
            raise ModelError(f"{where}: expected logits [1, {len(p)}, vocab] from the prefill; found "
                             f"{list(logits.shape)}")
        out.append(logits[0])
        del g
    return out


def genai_logits(folder: Path, inputs: dict[str, torch.Tensor], provider: str = "cpu", model=None) -> torch.Tensor:
    """Logits ``[B, T, V]`` of a padded batch: each row's real tokens (``attention_mask == 1``) run alone
    through the runtime, their logits put back at their positions (0 at padded slots, which the
    comparison masks). Example: right-padded ids ``[[5, 6, 7], [8, 9, pad]]`` -> prefills ``[5, 6, 7]``
    and ``[8, 9]``. ``model``: the folder's ``og.Model`` when already loaded (else loaded here)."""
    folder = Path(folder)
    model = model if model is not None else load_model(folder, provider)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    rows = prompt_logits(model, prompts, str(folder / _decoder_file(folder)), context_length(folder))
    vocab = rows[0].shape[-1]
    out = torch.zeros(ids.shape[0], ids.shape[1], vocab)
    for b, (m, r) in enumerate(zip(mask, rows)):
        out[b, m.bool()] = r
    return out
