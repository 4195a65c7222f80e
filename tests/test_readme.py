"""The README's Python API example runs as written (on a fixture model)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_api_snippet(fixture_models, tmp_path, monkeypatch):
    text = README.read_text()
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
    exec(compile(code, "README.md", "exec"), ns)
    from neuroada_tools.io.sidecar import read_delta, read_index

    index = read_index(tmp_path / "llama.k20.index.safetensors")
    delta = read_delta(tmp_path / "my.delta.safetensors", index)
    assert any(bool(t.abs().sum() > 0) for t in delta.deltas.values())
    # detach restored the base
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(model_dir)
    for (n, p), (_, q) in zip(ns["model"].state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(p, q), n
