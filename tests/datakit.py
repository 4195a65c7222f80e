"""Shared helpers of the data tests (tests/test_data_*.py): tokenizers trained here on a few
sentences with the ``tokenizers`` library (no downloads), file writers and exact-error matchers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from neuroada_tools.errors import DataError
from neuroada_tools.train.data import (
    PROMPT_TEMPLATE,
    PROMPT_TEMPLATE_NO_INPUT,
)

REPO = Path(__file__).resolve().parents[1]

SENTENCES = [
    PROMPT_TEMPLATE.format(instruction="Add two numbers.", input="2 and 3"),
    PROMPT_TEMPLATE_NO_INPUT.format(instruction="Say hello."),
    "the correct answer is true",
    "the correct answer is false",
    "Which gas do we breathe? nitrogen oxygen helium water vapor",
    "hello world, this is a tiny corpus for a tiny tokenizer.",
]


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------


def _bpe_tokenizer(bos_prefix: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(SENTENCES * 3, trainer)
    if bos_prefix:  # Llama-style: <s> before every text
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def _wordpiece_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    )
    tok.train_from_iterator(SENTENCES * 3, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _decode(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _plain_ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _raises(match_exact: str, exc=DataError):
    return pytest.raises(exc, match="^" + re.escape(match_exact) + "$")


INSTR = {"instruction": "Say hello.", "input": "", "output": "hello world", "answer": "x"}
