"""select.py: the fast bit-pattern top-k equals a stable-sort reference on fp32 |W|."""

from __future__ import annotations

import pytest
import torch

from neuroada_tools.index.criteria import magnitude_bits, reference_select, select
from neuroada_tools.kernels import native


@pytest.fixture(autouse=True, params=["native", "torch"])
def selection_path(request, monkeypatch):
    """Every test here runs on both paths: the compiled kernel and the pure-torch fallback."""
    if request.param == "torch":
        monkeypatch.setitem(native._state, "lib", None)
    elif native.kernel() is None:
        pytest.skip("kernel unavailable")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1, 3, 17, 64])
def test_magnitude_equals_reference(dtype, k):
    g = torch.Generator().manual_seed(k)
    w = torch.randn(300, 64, generator=g).to(dtype)
    # plant ties (equal magnitude, both signs) and zeros
    w[0, :8] = 0.5
    w[1, 10:20] = -0.25
    w[1, 30:40] = 0.25
    w[2] = 0.0
    got = select(w, k)
    assert got.dtype == torch.int32 and got.shape == (300, k)
    assert torch.equal(got, reference_select(w, k))


def test_worked_example_from_docstring():
    w = torch.tensor([[0.5, -2.0, 2.0, 1.0]])
    assert select(w, 2).tolist() == [[1, 2]]
    assert select(w, 1).tolist() == [[1]]
    assert select(w, 1, "smallest").tolist() == [[0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_smallest_equals_reference(dtype):
    w = torch.randn(50, 40).to(dtype)
    w[3, 5:9] = 1e-3
    assert torch.equal(select(w, 5, "smallest"), reference_select(w, 5, largest=False))


def test_transposed_view_and_wide_rows():
    w = torch.randn(70000, 4)  # stored [in, out]: logical rows have 70000 columns (int64 keys)
    logical = w.t()
    assert torch.equal(select(logical, 6), reference_select(logical, 6))


def test_rows_strictly_ascending_and_k_equals_d_in():
    w = torch.randn(9, 7)
    got = select(w, 7)
    assert torch.equal(got, torch.arange(7, dtype=torch.int32).expand(9, 7))


def test_random_is_seeded_per_tensor():
    w = torch.randn(20, 30)
    a = select(w, 4, "random", seed=1, salt="a.weight")
    assert torch.equal(a, select(w, 4, "random", seed=1, salt="a.weight"))
    assert not torch.equal(a, select(w, 4, "random", seed=2, salt="a.weight"))
    assert not torch.equal(a, select(w, 4, "random", seed=1, salt="b.weight"))
    assert bool((a[:, 1:] > a[:, :-1]).all())


def test_magnitude_bits_order_like_abs():
    w = torch.tensor([-1.0, 0.5, -0.0, 3.0, -3.0], dtype=torch.bfloat16)
    bits = magnitude_bits(w).to(torch.int32)
    assert bits[0] > bits[1] > bits[2]
    assert bits[3] == bits[4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1, 2, 5, 9])
def test_heavy_ties_match_reference(dtype, k):
    """Few distinct magnitudes: almost every row is ambiguous at its boundary."""
    g = torch.Generator().manual_seed(100 + k)
    w = torch.randint(-3, 4, (600, 40), generator=g).to(dtype)
    assert torch.equal(select(w, k), reference_select(w, k))
    assert torch.equal(select(w, k, "smallest"), reference_select(w, k, largest=False))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rows_longer_than_the_low_half(dtype):
    w = (torch.randn(70000, 3) * 0.1).to(dtype)  # logical rows of 70000 columns
    w[:100] = 0.25  # ties
    logical = w.t()
    for crit, largest in (("magnitude", True), ("smallest", False)):
        assert torch.equal(select(logical, 7, crit), reference_select(logical, 7, largest=largest))
