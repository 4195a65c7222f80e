"""The docstring examples of the adapter API (``neuroada_tools/adapters/``) run as written.

They run in a folder holding ``base/`` (the tiny Llama fixture), ``base.k4.index.safetensors``
(its index, k=4) and two deltas made on it, ``a.delta.safetensors`` and ``b.delta.safetensors``."""

from __future__ import annotations

import doctest
import importlib
import shutil

import pytest
import torch

from neuroada_tools.index.build import run_index
from neuroada_tools.io.sidecar import DeltaSidecar, read_index, write_delta


@pytest.fixture(scope="module")
def doc_dir(fixture_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("docs")
    shutil.copytree(fixture_models["llama"], d / "base")
    run_index(d / "base", 4, d / "base.k4.index.safetensors")
    index = read_index(d / "base.k4.index.safetensors")
    g = torch.Generator().manual_seed(7)
    for name in ("a", "b"):
        deltas = {n: 0.05 * torch.randn(t.shape, generator=g) for n, t in sorted(index.indices.items())}
        write_delta(d / f"{name}.delta.safetensors", DeltaSidecar(index.digest, deltas))
    return d


@pytest.mark.parametrize("name", ["api", "arithmetic", "trainer", "sft"])
def test_docstring_examples_run(name, doc_dir, monkeypatch):
    module = importlib.import_module(f"neuroada_tools.adapters.{name}")  # sft: needs trl (the dev extra has it)
    monkeypatch.chdir(doc_dir)
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module) if t.examples]
    assert tests, f"{module.__name__} has no examples"
    for t in tests:
        runner.run(t)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {module.__name__}"
    public = [n for n in getattr(module, "__all__", dir(module)) if not n.startswith("_")]
    documented = {t.name.rsplit(".", 1)[1] for t in tests}
    for n in public:
        obj = getattr(module, n)
        if callable(obj) and getattr(obj, "__module__", "") == module.__name__ and not isinstance(obj, type(doctest)):
            assert n in documented, f"{module.__name__}.{n} has no runnable example"
