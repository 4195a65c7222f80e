"""NEUROADA_KERNELS: which backend runs, no silent fallback, and a whole training step on Triton.

The Triton kernels run on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from neuroada_tools.index.build import run_index
from neuroada_tools.kernels import backend, native, triton_kernels
from neuroada_tools.kernels import ops as kernel_ops  # noqa: F401  (registers torch.ops.neuroada.*)
from neuroada_tools.kernels.reference import sddmm as reference_sddmm
from neuroada_tools.train.loop import TrainConfig, train

CPU = torch.device("cpu")
needs_triton = pytest.mark.skipif(not triton_kernels.available(), reason="triton is not installed")


def test_unknown_value_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("NEUROADA_KERNELS", "cuda")
    want = r"^NEUROADA_KERNELS='cuda' is not one of auto, triton, native, torch$"
    with pytest.raises(backend.KernelsError, match=want):
        backend.choose(CPU)


def test_auto_and_explicit_choices_on_cpu(monkeypatch):
    monkeypatch.delenv("NEUROADA_KERNELS", raising=False)
    assert backend.choose(CPU) == ("native" if native.kernel() is not None else "torch")
    monkeypatch.setenv("NEUROADA_KERNELS", "torch")
    assert backend.choose(CPU) == "torch"
    monkeypatch.setenv("NEUROADA_KERNELS", "native")
    with pytest.raises(backend.KernelsError, match="runs on CPU tensors only, found cuda"):
        backend.choose(torch.device("cuda"))


@needs_triton
def test_triton_on_cpu_without_the_interpreter_is_refused_not_replaced(monkeypatch):
    monkeypatch.setenv("NEUROADA_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    g, x = torch.randn(5, 3), torch.randn(5, 4)
    idx = torch.tensor([[0, 2], [1, 3], [0, 1]], dtype=torch.int32)
    with pytest.raises(backend.KernelsError, match="NEUROADA_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1"):
        torch.ops.neuroada.sddmm(g, x, idx)


@pytest.fixture
def triton_calls(monkeypatch):
    """NEUROADA_KERNELS=triton under the interpreter; counts the Triton SDDMM launches."""
    if not triton_kernels.available():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("NEUROADA_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = {"sddmm": 0}
    real = triton_kernels.sddmm

    def counting(*args, **kwargs):
        calls["sddmm"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_kernels, "sddmm", counting)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_op_runs_the_triton_kernel(triton_calls, dtype):
    gen = torch.Generator().manual_seed(0)
    g, x = torch.randn(17, 13, generator=gen).to(dtype), torch.randn(17, 29, generator=gen).to(dtype)
    idx = torch.stack([torch.randperm(29, generator=gen)[:3].sort().values for _ in range(13)]).int()
    got = torch.ops.neuroada.sddmm(g, x, idx)
    assert triton_calls["sddmm"] == 1
    torch.testing.assert_close(got, reference_sddmm(g, x, idx), rtol=1e-5, atol=1e-5)


def _train(fixture_models, tmp_path, name: str) -> dict[str, torch.Tensor]:
    index = tmp_path / "llama.k4.index.safetensors"
    if not index.exists():
        run_index(fixture_models["llama"], 4, index)
    data = tmp_path / "text.jsonl"
    texts = ["the cat sat on the mat", "a dog ran in the park today", "sparse deltas train fast"] * 2
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / f"{name}.delta.safetensors"
    train(TrainConfig(model=fixture_models["llama"], index=index, data=data, output=out, batch_size=2,
                      max_length=24, lr=1e-2, warmup_ratio=0.0, max_steps=2))
    return load_file(out)


def test_a_tiny_llama_training_step_on_triton_gives_the_default_deltas(fixture_models, tmp_path, triton_calls,
                                                                       monkeypatch):
    on_triton = _train(fixture_models, tmp_path, "triton")
    assert triton_calls["sddmm"] > 0  # every adapted matrix's delta gradient came from the Triton kernel
    launched = triton_calls["sddmm"]
    monkeypatch.setenv("NEUROADA_KERNELS", "auto")
    default = _train(fixture_models, tmp_path, "default")
    assert triton_calls["sddmm"] == launched  # the default path on CPU does not touch Triton
    assert on_triton.keys() == default.keys()
    for key in default:
        torch.testing.assert_close(on_triton[key], default[key], rtol=1e-4, atol=1e-6, msg=key)
