"""neuroada_tools.train.data.chat: conversational and prompt-completion records (TRL's formats),
``--template chat``, and the prompts evaluation renders (``render_prompts``).

The ids of a chat record must be exactly ``tokenizer.apply_chat_template`` of the conversation, on a
tiny tokenizer with a chat template and on the real SmolLM2 tokenizer. Hostile files are built in
``tmp_path`` and every error checks the exact class and message."""

from __future__ import annotations

import pytest

from neuroada_tools.errors import DataError, ModelError
from neuroada_tools.train.data import (
    IGNORE_INDEX,
    build_causal_lm_examples,
    detect_format,
    format_prompt,
    read_records,
    render_prompts,
)
from tests import chatkit
from tests.chatkit import CONVERSATION, NON_PREFIX_TEMPLATE
from tests.datakit import INSTR, _decode, _plain_ids, _raises, _write_jsonl

chat_tok, smollm2_tok = chatkit.chat_tok, chatkit.smollm2_tok  # the fixtures


def _chat(tok, messages, generation_prompt=False):
    return list(tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                        return_dict=False))


def _targets(ids, labels):
    """The runs of trained positions, as (start, end) pairs."""
    runs, start = [], None
    for n, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = n
        if label == IGNORE_INDEX and start is not None:
            runs.append((start, n))
            start = None
    return runs


# ---------------------------------------------------------------------------------------------
# ids are apply_chat_template's; the loss is on the assistant turns
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tok_name", ["chat_tok", "smollm2_tok"])
def test_conversation_ids_are_the_chat_template_and_loss_is_on_every_assistant_turn(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    (ex,) = build_causal_lm_examples([{"messages": CONVERSATION}], tok, max_length=4096)
    ids, labels = ex["input_ids"], ex["labels"]
    assert ids == _chat(tok, CONVERSATION)
    assert ex["attention_mask"] == [1] * len(ids)
    runs = _targets(ids, labels)
    assert len(runs) == 2  # the two assistant turns, nothing else
    for (start, end), k in zip(runs, (2, 4), strict=True):
        assert ids[:start] == _chat(tok, CONVERSATION[:k], generation_prompt=True)
        assert ids[:end] == _chat(tok, CONVERSATION[: k + 1])
        assert labels[start:end] == ids[start:end]
        text = _decode(tok, ids[start:end])
        assert text.startswith(CONVERSATION[k]["content"]) and tok.eos_token in text  # the turn and its end
    (on_prompt,) = build_causal_lm_examples([{"messages": CONVERSATION}], tok, max_length=4096,
                                            train_on_prompt=True)
    assert on_prompt["input_ids"] == ids and on_prompt["labels"] == ids


@pytest.mark.parametrize("tok_name", ["chat_tok", "smollm2_tok"])
def test_prompt_completion_records(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    prompt, completion = CONVERSATION[:4], CONVERSATION[4:]
    (ex,) = build_causal_lm_examples([{"prompt": prompt, "completion": completion}], tok, max_length=4096)
    n_prompt = len(_chat(tok, prompt, generation_prompt=True))
    assert ex["input_ids"] == _chat(tok, CONVERSATION)
    assert _targets(ex["input_ids"], ex["labels"]) == [(n_prompt, len(ex["input_ids"]))]
    # standard (strings): rendered as an instruction record is, with the prompt as it is
    (std,) = build_causal_lm_examples([{"prompt": "Add 2 and 3. ", "completion": "5"}], tok, max_length=4096)
    prefix = list(tok("a")["input_ids"][: -len(_plain_ids(tok, "a"))])
    n_prompt = len(prefix) + len(_plain_ids(tok, "Add 2 and 3. "))
    assert std["input_ids"] == prefix + _plain_ids(tok, "Add 2 and 3. ") + _plain_ids(tok, "5") + [tok.eos_token_id]
    assert std["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert std["labels"][n_prompt:] == std["input_ids"][n_prompt:]


@pytest.mark.parametrize("tok_name", ["chat_tok", "smollm2_tok"])
@pytest.mark.parametrize("extra", ["", "2 and 3"])
def test_template_chat_renders_instruction_records_as_two_turns(request, tok_name, extra):
    tok = request.getfixturevalue(tok_name)
    record = {"instruction": "Add two numbers.", "input": extra, "output": "the correct answer is 5"}
    user = "Add two numbers.\n\n2 and 3" if extra else "Add two numbers."
    turns = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    (ex,) = build_causal_lm_examples([record], tok, max_length=4096, template="chat")
    assert ex["input_ids"] == _chat(tok, turns)
    n_prompt = len(_chat(tok, turns[:1], generation_prompt=True))
    assert _targets(ex["input_ids"], ex["labels"]) == [(n_prompt, len(ex["input_ids"]))]
    (alpaca,) = build_causal_lm_examples([record], tok, max_length=4096)  # the default stays the paper's
    assert format_prompt("Add two numbers.", extra) in _decode(tok, alpaca["input_ids"])


@pytest.mark.parametrize("tok_name", ["chat_tok", "smollm2_tok"])
def test_render_prompts_match_training(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    records = [
        {"messages": CONVERSATION},
        {"prompt": CONVERSATION[:2], "completion": CONVERSATION[2:3]},
        {"prompt": "Add 2 and 3. ", "completion": "5"},
        INSTR,
    ]
    for template in ("alpaca", "chat"):  # one format per file: one record at a time
        built = [build_causal_lm_examples([r], tok, max_length=4096, template=template)[0] for r in records]
        prompts = [render_prompts([r], tok, template=template)[0] for r in records]
        for ex, p in zip(built, prompts, strict=True):
            assert ex["input_ids"][: len(p.prompt_ids)] == p.prompt_ids
            assert ex["labels"][len(p.prompt_ids)] != IGNORE_INDEX  # the reference starts right after
            assert ex["labels"][len(p.prompt_ids) - 1] == IGNORE_INDEX
        assert [p.reference for p in prompts] == ["the correct answer is 5", "hello world", "5", "hello world"]
    (p,) = render_prompts([{"messages": CONVERSATION}], tok)
    assert p.prompt_ids == _chat(tok, CONVERSATION[:4], generation_prompt=True)


def test_detect_new_formats(tmp_path):
    assert detect_format([{"messages": CONVERSATION}]) == "conversational"
    assert detect_format([{"prompt": "a", "completion": "b"}]) == "prompt-completion"
    p = _write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a"}])
    with _raises(f"{p} line 1: a 'prompt' without a 'completion' has nothing to train on "
                 "(prompt-completion data needs both)"):
        detect_format(read_records(p))


# ---------------------------------------------------------------------------------------------
# hostile records: one line naming the file and line
# ---------------------------------------------------------------------------------------------

_USER = {"role": "user", "content": "Say hello."}
_BOT = {"role": "assistant", "content": "hello world"}


@pytest.mark.parametrize("record, message", [
    ({"messages": [_USER, {"role": "bot", "content": "hi"}]},
     "line 2: messages message 2: unknown role 'bot' (expected 'system', 'user' or 'assistant')"),
    ({"messages": [_USER, {"role": 3, "content": "hi"}]},
     "line 2: messages message 2: unknown role number (expected 'system', 'user' or 'assistant')"),
    ({"messages": [_USER, {"role": "user", "content": "more"}]},
     "line 2: no assistant turn (the loss is on the assistant turns)"),
    ({"messages": [_USER, {"role": "assistant", "content": ["hello", "world"]}]},
     "line 2: messages message 2: 'content' must be a string, found list"),
    ({"messages": [_USER, {"role": "assistant", "content": None}]},
     "line 2: messages message 2: 'content' must be a string, found null"),
    ({"messages": [_USER, {"role": "assistant"}]}, "line 2: messages message 2: missing 'content'"),
    ({"messages": [_USER, "hello"]},
     "line 2: messages message 2: expected an object with 'role' and 'content', found string"),
    ({"messages": []}, "line 2: field 'messages' holds no messages"),
    ({"messages": {"role": "user"}}, "line 2: field 'messages' must be a list of messages, found object"),
    ({"messages": [_BOT, _USER]}, "line 2: messages message 1 is an assistant turn with nothing before it"),
    ({"messages": [_USER, {"role": "assistant", "content": "\ud800"}]},
     "line 2: messages message 2: 'content' is not valid Unicode (lone surrogate at character 1)"),
    ({"prompt": [_USER], "completion": [_USER]},
     "line 2: no assistant turn in 'completion' (the loss is on the completion)"),
    ({"prompt": [_USER], "completion": [{"role": "assistant", "content": 5}]},
     "line 2: completion message 1: 'content' must be a string, found number"),
    ({"prompt": "Say hello.", "completion": [_BOT]},
     "line 2: 'prompt' is string and 'completion' list; both must be strings or both lists of messages"),
    ({"prompt": [_USER]}, "line 2: missing field 'completion' (prompt-completion data needs it)"),
])
def test_bad_chat_records(tmp_path, chat_tok, record, message):
    good = {"messages": [_USER, _BOT]} if "messages" in record else {"prompt": [_USER], "completion": [_BOT]}
    p = _write_jsonl(tmp_path / "train.jsonl", [good, record])
    with _raises(f"{p} {message}"):
        build_causal_lm_examples(read_records(p), chat_tok, max_length=512)


def test_tokenizer_without_chat_template(tmp_path, bos_tok):
    p = _write_jsonl(tmp_path / "train.jsonl", [{"messages": [_USER, _BOT]}])
    message = (f"{p} line 1: this record is rendered with the tokenizer's chat template, and the tokenizer has none "
               "(set chat_template in its tokenizer_config.json, or use instruction data with --template alpaca)")
    with _raises(message, ModelError):
        build_causal_lm_examples(read_records(p), bos_tok, max_length=512)
    q = _write_jsonl(tmp_path / "inst.jsonl", [INSTR])
    with _raises(message.replace(str(p), str(q)), ModelError):
        build_causal_lm_examples(read_records(q), bos_tok, max_length=512, template="chat")
    with _raises(message.replace(str(p), str(q)), ModelError):
        render_prompts(read_records(q), bos_tok, template="chat")


def test_prompt_filling_max_length_is_an_error(tmp_path, chat_tok):
    p = _write_jsonl(tmp_path / "train.jsonl", [{"messages": [_USER, _BOT]}, {"messages": CONVERSATION}])
    n_prompt = len(_chat(chat_tok, CONVERSATION[:2], generation_prompt=True))
    first = build_causal_lm_examples(read_records(p)[:1], chat_tok, max_length=n_prompt + 1)
    assert first.stats.no_target == 0
    with _raises(f"{p} line 2: the prompt fills --max-length {n_prompt} ({n_prompt} tokens before the first "
                 "target token), leaving no target token"):
        build_causal_lm_examples(read_records(p), chat_tok, max_length=n_prompt)
    q = _write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Say hello. " * 20, "completion": "hello"}])
    with pytest.raises(DataError, match=rf"^{q} line 1: the prompt fills --max-length 8 \(\d+ tokens before"):
        build_causal_lm_examples(read_records(q), chat_tok, max_length=8)


def test_template_without_the_prefix_property_is_refused(tmp_path, chat_tok):
    tok = chat_tok.__class__(tokenizer_object=chat_tok.backend_tokenizer, eos_token="</s>")
    tok.chat_template = NON_PREFIX_TEMPLATE
    p = _write_jsonl(tmp_path / "train.jsonl", [{"messages": [_USER, _BOT]}])
    with _raises(f"{p} line 1: the chat template renders messages[:1] with the generation prompt as something "
                 "other than a prefix of the whole conversation, so the target tokens cannot be found; this "
                 "template cannot be used for training (pass a template whose earlier turns render the same "
                 "whatever follows)", ModelError):
        build_causal_lm_examples(read_records(p), tok, max_length=512)


def test_template_error_names_the_line(tmp_path, chat_tok):
    tok = chat_tok.__class__(tokenizer_object=chat_tok.backend_tokenizer, eos_token="</s>")
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('no system turns') }}{% endif %}{{ m['content'] }}{% endfor %}")
    p = _write_jsonl(tmp_path / "train.jsonl", [{"messages": [_USER, _BOT]}, {"messages": CONVERSATION}])
    with _raises(f"{p} line 2: the chat template refused the conversation (TemplateError: no system turns)"):
        build_causal_lm_examples(read_records(p), tok, max_length=512)


def test_text_records_have_no_prompt(lm_tok):
    with _raises("record 1: text data has no prompt and no reference answer"):
        render_prompts([{"text": "hello world"}], lm_tok)


# ---------------------------------------------------------------------------------------------
# generate --template: prompts rendered by the same code as training's
# ---------------------------------------------------------------------------------------------


def test_generate_templates_render_as_training(chat_tok):
    from neuroada_tools.generate.prompts import encode_prompts

    vocab = len(chat_tok)
    (chat,) = encode_prompts(chat_tok, ["Say hello."], vocab, "chat")
    assert chat == _chat(chat_tok, [_USER], generation_prompt=True)
    (alpaca,) = encode_prompts(chat_tok, ["Say hello."], vocab, "alpaca")
    (trained,) = build_causal_lm_examples([{"instruction": "Say hello.", "output": "hello world"}], chat_tok,
                                          max_length=512)
    assert trained["input_ids"][: len(alpaca)] == alpaca and trained["labels"][len(alpaca)] != IGNORE_INDEX
    assert encode_prompts(chat_tok, ["Say hello."], vocab) == [list(chat_tok("Say hello.")["input_ids"])]
    with _raises("prompt 2: field 'instruction' is empty"):
        encode_prompts(chat_tok, ["Say hello.", " "], vocab, "chat")
