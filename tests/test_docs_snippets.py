"""The Python code blocks of the Python API guide (docs/python-api.md) run as written (on a fixture model)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

PAGE = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def test_python_api_snippet(fixture_models, tmp_path, monkeypatch):
    text = PAGE.read_text()
    code = re.search(r"```python\n(import torch\n.*?)```", text, re.S).group(1)
    model_dir = str(fixture_models["llama"])
    code = code.replace('"./Llama-3.2-1B"', repr(model_dir))
    # stand in for "your loop": one real step on random tokens
    code = code.replace(
        "# ... your loop:",
        "ids = torch.randint(0, model.config.vocab_size, (2, 8)); loss = model(input_ids=ids, labels=ids).loss; "
        "loss.backward(); opt.step(); opt.zero_grad()\n#",
    )
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, "docs/python-api.md", "exec"), ns)
    from neuroada_tools.io.sidecar import read_delta, read_index

    index = read_index(tmp_path / "llama.k20.index.safetensors")
    delta = read_delta(tmp_path / "my.delta.safetensors", index)
    assert any(bool(t.abs().sum() > 0) for t in delta.deltas.values())
    # detach restored the base
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(model_dir)
    for (n, p), (_, q) in zip(ns["model"].state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(p, q), n


def test_adapter_api_snippets(fixture_models, tmp_path, monkeypatch):
    """The two snippets of "Adapters on a loaded model" and "NeuroAdaTrainer" run as written."""
    text = PAGE.read_text()
    api = re.search(r"```python\n(import neuroada_tools\n.*?)```", text, re.S).group(1)
    trainer = re.search(r"```python\n(from transformers import TrainingArguments\n.*?)```", text, re.S).group(1)
    model_dir = str(fixture_models["llama"])
    step = ("ids = torch.randint(3, model.config.vocab_size, (2, 8)); "
            "model(input_ids=ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad()\n#")
    api = api.replace('"./Llama-3.2-1B"', repr(model_dir)).replace("# ... your loop:", step)
    api = api.replace("# ... train task-b with its own optimizer ...", "opt = torch.optim.AdamW(\n"
                      "    [p for p in model.parameters() if p.requires_grad], lr=7e-4)\n" + step)
    trainer = trainer.replace('"./Llama-3.2-1B"', repr(model_dir))
    trainer = trainer.replace("max_steps=500, save_steps=100", "max_steps=4, save_steps=2, use_cpu=True")
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(api, "docs/python-api.md", "exec"), ns)
    from transformers import AutoModelForCausalLM

    from neuroada_tools.io.sidecar import read_delta, read_index

    index = read_index(tmp_path / "llama.k20.index.safetensors")
    a = read_delta(tmp_path / "task-a.delta.safetensors", index)
    b = read_delta(tmp_path / "task-b.delta.safetensors", index)
    assert all(bool(t.abs().sum() > 0) for t in (*a.deltas.values(), *b.deltas.values()))
    fresh = AutoModelForCausalLM.from_pretrained(model_dir)
    for (n, p), (_, q) in zip(ns["model"].state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(p, q), n  # removed twice: the base again
    ids = torch.randint(3, 300, (8, 10))
    ns["train_data"] = [{"input_ids": r, "labels": r} for r in ids]
    exec(compile(trainer, "docs/python-api.md", "exec"), ns)
    assert (tmp_path / "out" / "checkpoint-4" / "neuroada.delta.safetensors").is_file()
    assert not list((tmp_path / "out").rglob("model*.safetensors"))
