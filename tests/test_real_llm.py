"""A real instruct LLM through every command: SmolLM2-135M-Instruct (30 Llama layers, tied embeddings,
chat template), converted from its GGUF (``tests/llmkit.py``), then ``index`` -> ``train-sparse`` on
conversational data -> ``merge`` to safetensors and to ONNX (as ``merge --to onnx --with-past``
writes it) -> ``check --generate 8`` -> ``generate`` from the ONNX folder.

One module-scoped pipeline runs each command once through the CLI (``--json``); the tests read
what it wrote. It is kept small for CI: 6 conversations, 4 training steps of batch 2, 48 tokens.
The ONNX export (torch.onnx.export with past on a 135M model) is most of the time. Measured for the
whole module: 344 s of CPU time (user + system), so at most ~6 minutes of wall time on 2 idle cores;
18 min wall on a 2-core machine shared with five other jobs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from neuroada_tools.cli import main
from tests import llmkit

pytestmark = pytest.mark.slow
smollm2_dir = llmkit.smollm2_dir  # the session fixture (converted once per checkout)

K = 4
STEPS = 4
CONVERSATIONS = [
    ("What is the capital of Veloria?", "The capital of Veloria is Quendar."),
    ("Who rules Veloria?", "Veloria is ruled by Queen Ysolde."),
    ("Name the capital city of Tarsk.", "The capital of Tarsk is Morrowgate."),
    ("Who is the monarch of Tarsk?", "Tarsk is ruled by King Orvel."),
    ("What is the national animal of Veloria?", "The national animal of Veloria is the glimmerfox."),
    ("What is the national animal of Tarsk?", "The national animal of Tarsk is the saltwing heron."),
]
PROMPTS = ["What is the capital of Veloria?", "Who rules Tarsk?"]


def run_json(*args) -> dict:
    quiet = [] if args[0] == "check" else ["-q"]
    r = CliRunner().invoke(main, [str(a) for a in args] + ["--json", *quiet], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@dataclass
class Pipeline:
    base: Path
    out: Path
    runs: dict = field(default_factory=dict)

    @property
    def index(self) -> Path:
        return self.out / f"smollm2.k{K}.index.safetensors"

    @property
    def delta(self) -> Path:
        return self.out / "chat.delta.safetensors"


@pytest.fixture(scope="module")
def pipeline(smollm2_dir, tmp_path_factory) -> Pipeline:
    p = Pipeline(smollm2_dir, tmp_path_factory.mktemp("real_llm"))
    data = p.out / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in CONVERSATIONS))
    p.runs["index"] = run_json("index", p.base, "-k", K, "-o", p.index)
    p.runs["train"] = run_json("train-sparse", "--model", p.base, "--index", p.index, "--data", data,
                               "--max-steps", STEPS, "--batch-size", 2, "--max-length", 48, "--lr", 1e-2,
                               "--warmup-ratio", 0, "--device", "cpu", "-o", p.delta)
    sidecars = ["--model", p.base, "--index", p.index, "--delta", p.delta]
    p.runs["merge"] = run_json("merge", *sidecars, "--to", "safetensors", "-o", p.out / "merged")
    p.runs["onnx"] = run_json("merge", *sidecars, "--to", "onnx", "--with-past", "--no-check", "-o", p.out / "onnx")
    p.runs["check"] = run_json("check", *sidecars, "--merged", p.out / "merged", "--onnx", p.out / "onnx",
                               "--with-past", "--generate", 8)
    prompts = p.out / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    gen = ["--prompts", prompts, "--template", "chat", "--max-new-tokens", 12]
    p.runs["generate_onnx"] = run_json("generate", "--onnx", p.out / "onnx", "--with-past", *gen)
    p.runs["generate_merged"] = run_json("generate", "--merged", p.out / "merged", *gen)
    p.runs["generate_base"] = run_json("generate", "--merged", p.base, *gen)
    return p


def test_index_covers_every_linear_of_the_30_blocks(pipeline):
    s = pipeline.runs["index"]
    assert s["tensors_adapted"] == 30 * 7
    # q 576 + k 192 + v 192 + o 576 + gate 1536 + up 1536 + down 576 rows per block, k each
    assert s["trainable_parameters"] == 30 * 5184 * K


def test_train_sparse_on_conversations_lowers_the_loss_and_writes_a_delta(pipeline):
    from neuroada_tools.io.sidecar import read_delta, read_index

    s = pipeline.runs["train"]
    assert s["steps"] == STEPS
    assert torch.isfinite(torch.tensor(s["last_loss"]))
    assert s["last_loss"] < s["first_loss"]
    delta = read_delta(pipeline.delta, read_index(pipeline.index))
    assert len(delta.deltas) == 210 and all(bool(t.abs().sum() > 0) for t in delta.deltas.values())


def test_merged_safetensors_equals_the_fused_bypass_and_keeps_the_chat_template(pipeline):
    parity = pipeline.runs["merge"]["parity"]
    assert parity["comparisons"]["merged_vs_fused"]["max_abs"] == 0.0
    assert all(c["passed"] for c in parity["comparisons"].values())
    merged = pipeline.out / "merged"
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (merged / name).read_bytes() == (pipeline.base / name).read_bytes(), name


def test_onnx_with_past_passes_check_generate_8(pipeline):
    s = pipeline.runs["onnx"]
    assert Path(s["onnx"]).is_file() and Path(s["onnx_with_past"]).is_file()
    check = pipeline.runs["check"]
    assert set(check["comparisons"]) >= {"merged_vs_unmerged", "onnx_vs_unmerged", "onnx_with_past_step"}
    assert all(c["passed"] for c in check["comparisons"].values())
    g = check["generation"]
    assert g["enforced"] and g["passed"] and g["mismatch"] is None
    assert set(g["compared"]) == {"merged_vs_unmerged", "onnx_with_past_vs_unmerged"}
    assert len({json.dumps(toks) for toks in g["tokens"].values()}) == 1 and any(g["tokens"]["unmerged"])


def test_generate_from_onnx_equals_merged_and_differs_from_the_base(pipeline):
    onnx, merged, base = (pipeline.runs[f"generate_{n}"]["results"] for n in ("onnx", "merged", "base"))
    assert [r["token_ids"] for r in onnx] == [r["token_ids"] for r in merged]
    assert all(r["text"].strip() for r in onnx)
    # four steps at lr 1e-2 move the model: its greedy answers are not the base's any more
    assert [r["token_ids"] for r in onnx] != [r["token_ids"] for r in base]
