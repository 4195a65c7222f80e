"""Open the model to generate from: unmerged (base + bypass), a merged folder, or an ONNX folder.

Each ``open_*`` checks what it can before loading weights and refuses, with one line, what cannot
generate: an encoder-only model (BERT) or a classifier, an ONNX folder without the graph asked for
(``model_with_past.onnx`` under ``with_past``), a folder without ``config.json``. The result is a
``Source``: the ids the model can take (``vocab``: the input embedding's rows), its EOS ids inside
that vocabulary, a padding id inside it, its position limit, and a factory of fresh sessions.

Special ids outside the vocabulary (tiny test configs keep GPT-2's 50256 with a vocabulary of a few
hundred) are never fed: padding takes the first of pad / eos / bos that the embedding holds, else 0
(padded slots are masked, so the id only has to exist); an EOS id the model cannot produce is
dropped from the stop set.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from neuroada_tools.errors import ModelError
from neuroada_tools.forms import load_complete, load_unmerged, onnx_logits, with_past_session
from neuroada_tools.generate.decode import Session
from neuroada_tools.generate.sessions import FullRerun, OnnxWithPast, TorchCached
from neuroada_tools.hf import is_encoder, task_config, task_of_architectures
from neuroada_tools.hf.signature import first_id_within, forward_params, input_vocab_size, num_hidden_layers

MODEL_FILE = "model.onnx"
MODEL_WITH_PAST_FILE = "model_with_past.onnx"


@dataclass
class Source:
    """A model ready to generate. ``kind``: unmerged, merged, onnx; ``folder`` holds config and tokenizer."""

    kind: str
    folder: Path
    config: object
    vocab: int
    eos_ids: list[int]
    pad_id: int
    max_positions: int | None
    new_session: Callable[[], Session]
    detail: str

    def describe(self) -> dict:
        return {"kind": self.kind, "folder": str(self.folder), "detail": self.detail, "vocab": self.vocab,
                "eos_ids": self.eos_ids, "pad_id": self.pad_id}


def require_decoder(folder: Path, config) -> None:
    """Refuse configs that cannot generate text: encoder-only models, classifiers, encoder-decoders."""
    archs = list(getattr(config, "architectures", None) or [])
    name = archs[0] if archs else getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"{folder}: {name} is an encoder-decoder model; generate supports decoders (causal LMs) only")
    if is_encoder(config.to_dict()):
        raise ModelError(f"{folder}: {name} is an encoder-only model; generate needs a decoder (a causal LM)")
    task = task_of_architectures(archs)
    if task not in (None, "causal-lm"):
        raise ModelError(f"{folder}: {name} is a {task} model; generate needs a causal LM")


def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _generation_ids(folder: Path, key: str) -> list:
    path = folder / "generation_config.json"
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get(key) if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        value = None  # a broken generation config: the model config's ids serve
    return [value] if value is not None else []


def special_ids(folder: Path, config, vocab: int) -> tuple[list[int], int]:
    """``(eos ids, pad id)`` the embedding holds: generation_config.json first, then config.json."""
    text = _text_config(config)
    eos_candidates = _generation_ids(folder, "eos_token_id") + [getattr(text, "eos_token_id", None)]
    eos: list[int] = []
    for c in eos_candidates:
        for i in c if isinstance(c, (list, tuple)) else [c]:
            if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab and i not in eos:
                eos.append(i)
        if eos:
            break
    pad = first_id_within([*_generation_ids(folder, "pad_token_id"), getattr(text, "pad_token_id", None), *eos,
                           getattr(text, "bos_token_id", None)], vocab)
    return eos, 0 if pad is None else pad


def max_positions(config) -> int | None:
    text = _text_config(config)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _config(folder: Path):
    if not folder.is_dir():
        raise ModelError(f"{folder}: no such folder")
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder}: not a model folder (no config.json)")
    config = task_config(folder, "causal-lm")
    require_decoder(folder, config)
    return config


def torch_session(model: nn.Module, pad_id: int) -> Callable[[], Session]:
    """Fresh ``TorchCached`` sessions, or ``FullRerun`` ones for a forward that takes no cache."""
    params = forward_params(model)
    if "cache" in params or "past_key_values" in params:
        return lambda: TorchCached(model, pad_id)

    def logits_of(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits

    return lambda: FullRerun(logits_of, pad_id)


def from_model(kind: str, folder: Path, model: nn.Module, *, vocab: int | None = None) -> Source:
    """A ``Source`` around a loaded transformers causal LM (``vocab``: override the embedding's rows)."""
    model.eval()
    vocab = input_vocab_size(model) if vocab is None else vocab
    eos, pad = special_ids(folder, model.config, vocab)
    return Source(kind, folder, model.config, vocab, eos, pad, max_positions(model.config),
                  torch_session(model, pad), f"{type(model).__name__} (torch, KV cache)")


def open_unmerged(model_dir: Path, index_path: Path, delta_path: Path) -> Source:
    """The base with the sidecars attached on the reference path (``forms.load_unmerged``)."""
    model_dir = Path(model_dir)
    _config(model_dir)
    model, task = load_unmerged(model_dir, Path(index_path), Path(delta_path))
    if task != "causal-lm":
        raise ModelError(f"{delta_path}: a {task} delta; generate needs one trained as causal-lm")
    return from_model("unmerged", model_dir, model)


def open_merged(folder: Path) -> Source:
    """A merged (or any complete) causal-LM folder, loaded with transformers."""
    folder = Path(folder)
    _config(folder)
    model, _ = load_complete(folder, "causal-lm")
    return from_model("merged", folder, model)


def open_onnx(folder: Path, *, with_past: bool, provider: str = "cpu", vocab: int | None = None) -> Source:
    """An ONNX folder: ``model_with_past.onnx`` step by step (``with_past``), else ``model.onnx`` re-run;
    an ORT GenAI folder (``genai_config.json``) runs on its own runtime, KV cache included (``genai.py``)."""
    folder = Path(folder)
    from neuroada_tools.generate.genai import is_genai_folder

    if is_genai_folder(folder):
        return open_genai(folder, provider=provider, vocab=vocab)
    config = _config(folder)
    name = MODEL_WITH_PAST_FILE if with_past else MODEL_FILE
    path = folder / name
    if not path.is_file():
        how = ("export with: merge --to onnx --with-past, or leave out --with-past" if with_past
               else "export with: merge --to onnx")
        raise ModelError(f"{folder}: no {name} ({how})")
    vocab = int(_text_config(config).vocab_size) if vocab is None else vocab
    eos, pad = special_ids(folder, config, vocab)
    if with_past:
        layers = num_hidden_layers(config)
        session = with_past_session(path, layers, provider)
        new, detail = (lambda: OnnxWithPast(session, str(path), layers, pad)), f"{name} (ONNX Runtime, KV cache)"
    else:
        logits_of = onnx_logits(path, provider)
        new, detail = (lambda: FullRerun(logits_of, pad)), f"{name} (ONNX Runtime, full re-run per token)"
    return Source("onnx", folder, config, vocab, eos, pad, max_positions(config), new, detail)


def open_genai(folder: Path, *, provider: str = "cpu", vocab: int | None = None):
    """A ``Source`` over onnxruntime-genai's runtime (``open_onnx`` sends ORT GenAI folders here)."""
    from neuroada_tools.generate.genai import GenAISession, _decoder_file, context_length, load_model, precision_of

    folder = Path(folder)
    config = _config(folder)
    vocab = int(_text_config(config).vocab_size) if vocab is None else vocab
    eos, pad = special_ids(folder, config, vocab)
    model = load_model(folder, provider)
    where = str(folder / _decoder_file(folder))
    limit = context_length(folder)
    detail = f"{_decoder_file(folder)} (ORT GenAI runtime, {precision_of(folder)}, {provider}, KV cache)"
    return Source("onnx-genai", folder, config, vocab, eos, pad, max_positions(config),
                  lambda: GenAISession(model, where, limit), detail)
