"""Shared by the evaluate tests: SmolLM2-135M-Instruct as a Hugging Face folder, and the independent
reference computations the tests hold ``evaluate`` to.

``smollm2_folder(out)`` fills ``out`` with links to the cached SmolLM2 conversion
(``tests/llmkit.py``, ``neuroada_tools.hf.gguf``), so no module converts the GGUF again.

The references are written apart from ``neuroada_tools/evaluate``: one sequence per forward, no
padding, no batching, plain ``torch.log_softmax`` over the model's logits.
"""

from __future__ import annotations

from pathlib import Path

import torch


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
