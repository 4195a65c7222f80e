"""generate: the same greedy tokens from every form of a tuned model, batched (left padding) or one
prompt at a time; stop at EOS per sequence; prompt files; sampling; one-line errors.

The decoders are the tiny fixtures with a small random delta (``tests/genkit.py``): their greedy
tokens differ from the base's (``test_parity_generate.py`` shows it), so agreement is not vacuous.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from neuroada_tools.cli import main
from neuroada_tools.errors import DataError, ModelError
from neuroada_tools.generate.decode import Generated, Sampling, choose_tokens, generate_ids, pad_left, pad_right
from neuroada_tools.generate.prompts import read_prompts
from neuroada_tools.generate.sessions import FullRerun
from neuroada_tools.hf import load_tokenizer

PROMPTS = [
    "The quick brown fox",
    "Once upon a time there was a little town by the sea. The people",
    "What is",
    "The capital of France is Paris. What is two plus three?",
    "I loved the music",
]
NEW = 8


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def generate_json(*args) -> dict:
    r = run_cli("generate", *args, "--json", "-q")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def tokens(summary: dict) -> list[list[int]]:
    return [r["token_ids"] for r in summary["results"]]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def one_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


# --------------------------------------------------------------------------- every form, batched and alone


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_every_form_gives_the_same_tokens_batched_and_one_by_one(decoder_forms, prompts_file, name):
    f = decoder_forms(name)
    forms = {
        "unmerged": f.unmerged_args(),
        "merged": ["--merged", f.merged],
        "onnx_with_past": ["--onnx", f.onnx, "--with-past"],
        "onnx_rerun": ["--onnx", f.onnx],
    }
    seen = {}
    for form, args in forms.items():
        batched = generate_json(*args, "--prompts", prompts_file, "--max-new-tokens", NEW, "--batch-size", 8)
        alone = generate_json(*args, "--prompts", prompts_file, "--max-new-tokens", NEW, "--batch-size", 1)
        assert tokens(batched) == tokens(alone), form
        assert [r["text"] for r in batched["results"]] == [r["text"] for r in alone["results"]]
        seen[form] = tokens(batched)
    assert all(t == seen["unmerged"] for t in seen.values()), seen
    lengths = {len(t) for t in seen["unmerged"]}
    assert lengths <= set(range(1, NEW + 1)) and max(lengths) == NEW  # EOS may end some rows early


def test_json_holds_prompts_token_ids_and_texts(decoder_forms, fixture_models):
    f = decoder_forms("llama")
    d = generate_json("--merged", f.merged, "--prompt", PROMPTS[0], "--max-new-tokens", 5)
    tok = load_tokenizer(fixture_models["llama"])
    assert d["prompts"] == [PROMPTS[0]] and d["max_new_tokens"] == 5 and d["sampling"] == {"mode": "greedy"}
    (r,) = d["results"]
    assert r["prompt"] == PROMPTS[0] and r["prompt_ids"] == tok(PROMPTS[0])["input_ids"]
    assert 1 <= len(r["token_ids"]) <= 5 and d["new_tokens"] == len(r["token_ids"])
    full = tok.decode(r["prompt_ids"] + r["token_ids"], skip_special_tokens=True)
    assert PROMPTS[0] + r["text"] == full
    assert d["source"]["kind"] == "merged" and d["source"]["eos_ids"] == [0]
    human = run_cli("generate", "--merged", f.merged, "--prompt", PROMPTS[0], "--max-new-tokens", 5)
    assert human.exit_code == 0 and human.stdout == full + "\n"


def test_stops_at_eos_per_sequence(decoder_forms, prompts_file, tmp_path):
    f = decoder_forms("gpt2")
    before = tokens(generate_json("--merged", f.merged, "--prompts", prompts_file, "--max-new-tokens", NEW))
    # the first token of prompt 1 that is new after step 1 becomes EOS
    at = next(i for i in range(1, NEW) if before[0][i] not in before[0][:i])
    eos = before[0][at]
    folder = tmp_path / "merged"
    shutil.copytree(f.merged, folder)
    gen_cfg = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**gen_cfg, "eos_token_id": eos}))
    d = generate_json("--merged", folder, "--prompts", prompts_file, "--max-new-tokens", NEW)
    for old, r in zip(before, d["results"]):
        want = old[: old.index(eos) + 1] if eos in old else old
        assert r["token_ids"] == want
        assert r["stop"] == ("eos" if eos in old else "length")
    assert d["results"][0]["stop"] == "eos" and len(d["results"][0]["token_ids"]) == at + 1
    assert any(r["stop"] == "length" for r in d["results"])  # the others went on


# --------------------------------------------------------------------------- the loop, on a scripted session


class Scripted:
    """A session whose logits pick ``script[row][step]`` (a one-hot of width 6); records what it was fed."""

    def __init__(self, script):
        self.script, self.step, self.fed = script, 0, []

    def _logits(self):
        out = torch.zeros(len(self.script), 6)
        for b, row in enumerate(self.script):
            out[b, row[min(self.step, len(row) - 1)]] = 1.0
        return out

    def first(self, prompts):
        self.fed.append([list(p) for p in prompts])
        return self._logits()

    def next(self, tokens):
        self.fed.append(tokens.tolist())
        self.step += 1
        return self._logits()


def test_loop_stops_each_row_at_eos_and_keeps_feeding_finished_rows():
    s = Scripted([[1, 2, 5, 3], [4, 4, 4, 4]])
    out = generate_ids(s, [[1, 2], [3]], 4, eos_ids=[2, 99], vocab=6)
    assert out == [Generated([1, 2], [1, 2], "eos"), Generated([3], [4, 4, 4, 4], "length")]
    assert s.fed == [[[1, 2], [3]], [1, 4], [2, 4], [5, 4]]  # row 0 still fed after its EOS; ignored
    s = Scripted([[2], [2]])
    assert [g.stop for g in generate_ids(s, [[1], [1]], 4, eos_ids=[2], vocab=6)] == ["eos", "eos"]
    assert len(s.fed) == 1  # every row done: no further step
    with pytest.raises(ModelError, match="^prompt 2: no tokens"):
        generate_ids(Scripted([[1]]), [[1], []], 3, eos_ids=[], vocab=6)


def test_choose_tokens_keeps_to_ids_the_embedding_holds_and_samples_reproducibly():
    logits = torch.tensor([[0.0, 3.0, 9.0], [5.0, 1.0, 2.0]])
    assert choose_tokens(logits, 2, Sampling()).tolist() == [1, 0]  # id 2 lies outside a 2-row embedding
    assert choose_tokens(logits, 3, Sampling()).tolist() == [2, 0]
    g = torch.Generator().manual_seed(0)
    assert choose_tokens(logits, 3, Sampling(temperature=5.0, top_k=1), [g, g]).tolist() == [2, 0]  # top-1 = greedy
    flat = torch.zeros(1, 50)  # uniform: only the generator decides

    def draw(seed: int) -> int:
        return int(choose_tokens(flat, 50, Sampling(1.0, 0, seed), [torch.Generator().manual_seed(seed)]))

    assert draw(1) == draw(1) and len({draw(s) for s in range(8)}) > 1
    with pytest.raises(ModelError, match="temperature"):
        Sampling(temperature=-1.0)


def test_sampled_tokens_do_not_depend_on_the_batch(decoder_forms, prompts_file):
    f = decoder_forms("llama")
    args = ["--merged", f.merged, "--prompts", prompts_file, "--max-new-tokens", NEW, "--temperature", "0.9",
            "--top-k", "50", "--seed", "7"]
    a = generate_json(*args, "--batch-size", 8)
    assert a["sampling"] == {"mode": "sample", "temperature": 0.9, "top_k": 50, "seed": 7}
    assert tokens(a) == tokens(generate_json(*args, "--batch-size", 2))
    assert tokens(a) == tokens(generate_json(*args, "--batch-size", 8))
    other = generate_json(*args[:-1], "8", "--batch-size", 8)
    assert tokens(other) != tokens(a)
    greedy = generate_json("--merged", f.merged, "--prompts", prompts_file, "--max-new-tokens", NEW)
    assert tokens(greedy) != tokens(a)


def test_padding_helpers_and_full_rerun_read_each_rows_last_real_token():
    ids, mask = pad_left([[5, 6, 7], [8]], 0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_right([[5, 6, 7], [8]], 0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    seen = []

    def echo(ids, mask):  # logits: one-hot of the id at each position
        seen.append((ids.clone(), mask.clone()))
        return torch.nn.functional.one_hot(ids, 10).float()

    s = FullRerun(echo, pad_id=0)
    assert s.first([[5, 6, 7], [8]]).argmax(-1).tolist() == [7, 8]
    assert s.next(torch.tensor([1, 2])).argmax(-1).tolist() == [1, 2]
    assert seen[-1][0].tolist() == [[5, 6, 7, 1], [8, 2, 0, 0]]
    assert seen[-1][1].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


# --------------------------------------------------------------------------- prompt files


def test_prompt_files_plain_and_jsonl(tmp_path):
    plain = tmp_path / "p.txt"
    plain.write_bytes(b"\xef\xbb\xbfHello there\r\n\n  \nSecond one\n")
    assert read_prompts(plain) == ["Hello there", "Second one"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "A", "id": 1}\n\n{"prompt": "B\\nC"}\n')
    assert read_prompts(jsonl) == ["A", "B\nC"]
    for body, message in [
        ('{"prompt": "A"}\n{"prompt": \n', r"p\.jsonl: line 2: invalid JSON"),
        ('{"prompt": "A"}\n{"text": "B"}\n', r'p\.jsonl: line 2: expected an object with a string "prompt"'),
        ("\n\n", r"p\.jsonl: no prompts"),
    ]:
        jsonl.write_text(body)
        with pytest.raises(DataError, match=message):
            read_prompts(jsonl)
    plain.write_bytes(b"fine\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"p\.txt: line 2: not UTF-8"):
        read_prompts(plain)


# --------------------------------------------------------------------------- one-line errors


def test_errors_are_one_line(decoder_forms, fixture_models, tmp_path):
    f = decoder_forms("llama")
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(f.merged, no_tok, ignore=shutil.ignore_patterns("tokenizer*"))
    no_past = tmp_path / "no-past"
    shutil.copytree(f.onnx, no_past, ignore=shutil.ignore_patterns("model_with_past*"))
    cases = [
        (["--merged", no_tok, "--prompt", "Hi"], r"no-tokenizer: no tokenizer .*pass --tokenizer DIR"),
        (["--merged", fixture_models["bert-cls"], "--prompt", "Hi"],
         r"bert-cls: BertForSequenceClassification is an encoder-only model; generate needs a decoder"),
        (["--merged", fixture_models["bert-base"], "--prompt", "Hi"], r"bert-base: BertModel is an encoder-only model"),
        (["--onnx", no_past, "--with-past", "--prompt", "Hi"],
         r"no-past: no model_with_past\.onnx \(export with: merge --to onnx --with-past, or leave out --with-past\)"),
        (["--merged", f.merged, "--prompt", "Hi", "--max-new-tokens", 64],
         r"prompt 1: \d+ tokens \+ 64 new tokens exceed the model's 64 positions"),
        (["--merged", f.merged, "--prompts", tmp_path / "missing.txt"], r"missing\.txt: cannot read"),
        (["--merged", tmp_path / "nowhere", "--prompt", "Hi"], r"nowhere: no such folder"),
    ]
    for args, pattern in cases:
        r = run_cli("generate", *args)
        assert r.exit_code == 2, (args, r.output)
        assert re.fullmatch("error: .*" + pattern + ".*", one_line(r)), (pattern, r.stderr)
    # the tokenizer of another folder serves with --tokenizer
    r = run_cli("generate", "--merged", no_tok, "--tokenizer", f.merged, "--prompt", "Hi", "--max-new-tokens", 2)
    assert r.exit_code == 0, r.output
    # working without model.onnx's KV cache is still possible: the full re-run
    r = run_cli("generate", "--onnx", no_past, "--prompt", "Hi", "--max-new-tokens", 2)
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--merged", "x", "--onnx", "y"],
        ["--merged", "x", "--model", "b"],
        ["--merged", "x", "--with-past"],
        ["--merged", "x", "--top-k", "5"],
        ["--merged", "x", "--prompt", "a", "--prompts", "f"],
    ],
)
def test_usage_errors(args):
    if "--prompt" not in args:
        args = [*args, "--prompt", "Hi"]
    r = run_cli("generate", *args)
    assert r.exit_code == 2 and "Traceback" not in r.output
