"""`train-sparse` and `index --criterion gradient` on conversational data and with `--template chat`,
on the tiny Llama fixture given a chat template (a copy of its folder; the base stays untouched)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from neuroada_tools.cli import main
from neuroada_tools.index.build import run_index
from neuroada_tools.io.sidecar import read_delta, read_index
from neuroada_tools.train import loop as train_mod
from neuroada_tools.train.data import IGNORE_INDEX, build_causal_lm_examples, read_records

#: the fixture tokenizer's only special token ends every turn; "\n" after the role keeps the
#: generation prompt a token prefix of the assistant turn
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}assistant\n{% endif %}"
)
QA = [("What is the capital of France?", "Paris."), ("Name a colour.", "Red.")]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cli(*args) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="module")
def chat(fixture_models, tmp_path_factory) -> dict[str, Path]:
    """A copy of the tiny Llama with a chat template, its k=4 index, and data in three formats."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("chat")
    model = d / "llama-chat"
    shutil.copytree(fixture_models["llama"], model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(model)
    index = d / "llama.k4.index.safetensors"
    run_index(model, 4, index)
    turns = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA]
    return {
        "model": model,
        "index": index,
        "messages": write_jsonl(d / "messages.jsonl", [{"messages": t} for t in turns] * 2),
        "multi": write_jsonl(d / "multi.jsonl", [{"messages": turns[0] + turns[1]}] * 4),
        "instruction": write_jsonl(d / "inst.jsonl", [{"instruction": q, "input": "", "output": a} for q, a in QA] * 2),
        "prompt-completion": write_jsonl(d / "pc.jsonl", [{"prompt": t[:1], "completion": t[1:]} for t in turns] * 2),
    }


def targets_per_step(chat, data: str, batch: int, **kw) -> list[int]:
    """The loss's target tokens of each batch of the file, in order (the model shifts labels by one)."""
    from transformers import AutoTokenizer

    built = build_causal_lm_examples(read_records(chat[data]), AutoTokenizer.from_pretrained(chat["model"]),
                                     max_length=64, **kw)
    counts = [sum(label != IGNORE_INDEX for label in ex["labels"][1:]) for ex in built]
    return [sum(counts[i:i + batch]) for i in range(0, len(counts), batch)]


def train_cli(chat, data: str, out: Path, *extra) -> dict:
    code, stdout, stderr = cli(
        "train-sparse", "--model", chat["model"], "--index", chat["index"], "--data", chat[data], "-o", out,
        "--max-steps", 4, "--batch-size", 2, "--lr", 1e-2, "--warmup-ratio", 0, "--seed", 1, "--json", "-q", *extra)
    assert code == 0, stderr
    return json.loads(stdout)


def test_conversational_data_trains_on_the_assistant_turns(chat, tmp_path):
    s = train_cli(chat, "multi", tmp_path / "m.delta.safetensors")
    assert s["steps"] == 4 and s["skipped_examples"] == 0
    assert s["last_loss"] < s["first_loss"], s
    assert s["target_tokens"] == 2 * sum(targets_per_step(chat, "multi", 2))  # 4 steps: the file twice
    delta = read_delta(tmp_path / "m.delta.safetensors", read_index(chat["index"]))
    assert all(bool(t.abs().sum() > 0) for t in delta.deltas.values())
    # generate --template chat prompts the tuned model as training rendered its prompts
    from transformers import AutoTokenizer

    code, stdout, stderr = cli("generate", "--model", chat["model"], "--index", chat["index"], "--delta",
                               tmp_path / "m.delta.safetensors", "--prompt", QA[0][0], "--template", "chat",
                               "--max-new-tokens", 3, "--json", "-q")
    assert code == 0, stderr
    (result,) = json.loads(stdout)["results"]
    user = [{"role": "user", "content": QA[0][0]}]
    tok = AutoTokenizer.from_pretrained(chat["model"])
    assert result["prompt_ids"] == list(tok.apply_chat_template(user, add_generation_prompt=True, return_dict=False))


def test_template_chat_trains_exactly_as_the_same_conversations(chat, tmp_path):
    a = train_cli(chat, "messages", tmp_path / "a.delta.safetensors")
    b = train_cli(chat, "instruction", tmp_path / "b.delta.safetensors", "--template", "chat")
    c = train_cli(chat, "prompt-completion", tmp_path / "c.delta.safetensors")
    assert a["target_tokens"] == b["target_tokens"] == c["target_tokens"]
    index = read_index(chat["index"])
    deltas = [read_delta(tmp_path / f"{n}.delta.safetensors", index).deltas for n in "abc"]
    for name, t in deltas[0].items():
        assert torch.equal(t, deltas[1][name]) and torch.equal(t, deltas[2][name]), name


def test_chat_data_errors_are_one_line_before_the_model_loads(chat, fixture_models, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        pytest.fail("a model was loaded before the data was checked")

    monkeypatch.setattr(train_mod, "load_model", no_loading)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                              {"role": "assistant", "content": "Hello."}]},
                                               {"messages": [{"role": "human", "content": "Hi"}]}])
    out = tmp_path / "out" / "x.delta.safetensors"
    out.parent.mkdir()
    code, _, stderr = cli("train-sparse", "--model", chat["model"], "--index", chat["index"], "--data", bad,
                          "-o", out, "--max-steps", 1)
    assert code == 2
    assert stderr.strip() == (f"error: {bad} line 2: messages message 1: unknown role 'human' (expected 'system', "
                              "'user' or 'assistant')")
    # the plain fixture has no chat template: named with the first chat record
    code, _, stderr = cli("train-sparse", "--model", fixture_models["llama"], "--index", chat["index"],
                          "--data", chat["instruction"], "--template", "chat", "-o", out, "--max-steps", 1)
    assert code == 2 and stderr.strip().startswith(
        f"error: {chat['instruction']} line 1: this record is rendered with the tokenizer's chat template, "
        "and the tokenizer has none"), stderr
    assert list(out.parent.iterdir()) == []


def test_gradient_index_with_template_chat(chat, tmp_path):
    outs = {}
    for data, extra in (("instruction", ["--template", "chat"]), ("messages", [])):
        outs[data] = tmp_path / f"{data}.index.safetensors"
        code, stdout, stderr = cli("index", chat["model"], "-k", 2, "--criterion", "gradient", "--data",
                                   chat[data], *extra, "--device", "cpu", "-o", outs[data], "--json", "-q")
        assert code == 0, stderr
        assert json.loads(stdout)["calibration"]["template"] == ("chat" if extra else "alpaca")
    a, b = (read_index(outs[d]) for d in ("instruction", "messages"))
    assert all(torch.equal(a.indices[n], b.indices[n]) for n in a.indices)  # the same examples, the same scores
    code, _, stderr = cli("index", chat["model"], "-k", 2, "--template", "chat", "-o", tmp_path / "m.index.safetensors")
    assert code == 2 and stderr.strip() == (
        "error: --template only applies to --criterion gradient (the magnitude criterion uses no data)")
