"""Prompts in and text out: read a prompts file, tokenize prompts, decode what was generated.

A prompts file is either JSONL, one object with a string ``"prompt"`` per line (chosen when the first
non-blank line starts with ``{``), or plain text, one prompt per line. Blank lines are skipped.
Errors name the file and the line; a line over ``MAX_LINE_BYTES`` is refused.

Tokenizing adds the tokenizer's own special tokens (a Llama ``<s>``). With a template, each prompt is
taken as an instruction and rendered as ``train-sparse --template`` renders an instruction record's
prompt (the same code, ``train.data.chat.render_prompts``): ``alpaca`` wraps it in the Alpaca /
LLM-Adapters prompt, ``chat`` makes it a user turn of the tokenizer's chat template followed by the
generation prompt. A model trained with a template is then prompted as it was trained. A special
token the model's embedding lacks (a tiny test model's tokenizer) is left out; any other id outside the embedding is
an error naming the prompt, since the tokenizer then belongs to another model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from neuroada_tools.errors import DataError, ModelError
from neuroada_tools.io.jsontext import parse_json

MAX_LINE_BYTES = 1 << 20
PROMPT_TEMPLATES = ("plain", "alpaca", "chat")
"""``generate --template``: the prompt as it is, or rendered as train-sparse's ``--template`` renders it."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def read_prompts(path: Path) -> list[str]:
    """The prompts of a JSONL or plain-text file, in order.

    Example: a file ``{"prompt": "Hi"}\\n\\n{"prompt": "Bye"}`` -> ``["Hi", "Bye"]``; a file
    ``Hi\\nBye\\n`` -> the same.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines = raw.split(b"\n")
    first = next((line.strip() for line in lines if line.strip()), b"")
    jsonl = first.startswith(b"{")
    prompts: list[str] = []
    for n, line in enumerate(lines, start=1):
        if len(line) > MAX_LINE_BYTES:
            raise DataError(f"{path}: line {n}: longer than {MAX_LINE_BYTES} bytes")
        if not line.strip():
            continue
        if jsonl:
            record = parse_json(line, DataError, f"{path}: line {n}: invalid JSON ({{why}})",
                                f"{path}: line {n}: JSON nested too deeply")
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise DataError(f'{path}: line {n}: expected an object with a string "prompt"')
            prompts.append(record["prompt"])
        else:
            try:
                prompts.append(line.rstrip(b"\r").decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {n}: not UTF-8 ({e.reason} at byte {e.start})") from None
    if not prompts:
        raise DataError(f"{path}: no prompts (one per line, or JSONL with \"prompt\")")
    return prompts


def load_prompt_tokenizer(folder: Path):
    """The tokenizer in ``folder``, or one line saying there is none."""
    from neuroada_tools.hf import load_tokenizer

    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"{folder}: no tokenizer (no {' / '.join(TOKENIZER_FILES[:2])}); pass --tokenizer DIR")
    return load_tokenizer(folder)


def template_ids(tokenizer, prompts: Sequence[str], template: str) -> list[list[int]]:
    """Token ids of every prompt as an instruction under ``template`` (``alpaca`` or ``chat``).

    Example: ``template_ids(tok, ["Say hello."], "chat")`` equals
    ``tok.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True)``.
    """
    from neuroada_tools.train.data.chat import render_prompts
    from neuroada_tools.train.data.records import RecordList

    records = RecordList([{"instruction": t, "output": ""} for t in prompts],
                         locations=[f"prompt {n}" for n in range(1, len(prompts) + 1)])
    return [p.prompt_ids for p in render_prompts(records, tokenizer, fmt="instruction", template=template)]


def encode_prompts(tokenizer, prompts: Sequence[str], vocab: int, template: str = "plain") -> list[list[int]]:
    """Token ids of every prompt, each id inside ``[0, vocab)`` (module docstring)."""
    if template not in PROMPT_TEMPLATES:
        raise DataError(f"unknown template {template!r} (expected one of {', '.join(PROMPT_TEMPLATES)})")
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    rendered = None if template == "plain" else template_ids(tokenizer, prompts, template)
    out = []
    for n, text in enumerate(prompts, start=1):
        if rendered is None:
            ids = [int(i) for i in tokenizer(text, add_special_tokens=True)["input_ids"]]
        else:
            ids = rendered[n - 1]
        ids = [i for i in ids if i < vocab or i not in specials]
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise ModelError(
                f"prompt {n}: token id {bad} ({tokenizer.convert_ids_to_tokens(bad)!r}) lies outside the model's "
                f"{vocab}-token embedding; is the tokenizer of another model?"
            )
        if not ids:
            raise ModelError(f"prompt {n}: no tokens (an empty prompt)")
        out.append(ids)
    return out


def completion_text(tokenizer, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    """The text the new tokens add after the prompt (special tokens such as EOS left out).

    Decoded together with the prompt and cut after it, so a tokenizer that drops a leading space
    when decoding alone (SentencePiece) still gives ``" Paris"`` after ``"The capital is"``.
    """
    head = tokenizer.decode(list(prompt_ids), skip_special_tokens=True)
    full = tokenizer.decode(list(prompt_ids) + list(new_ids), skip_special_tokens=True)
    if full.startswith(head):
        return full[len(head):]
    return tokenizer.decode(list(new_ids), skip_special_tokens=True)
