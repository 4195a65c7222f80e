"""Shared pytest fixtures.

`fixture_models`: the tiny random-weight Hugging Face folders of `fixtures/build.py`, built once per
session (a few seconds) into a temporary folder. Treat them as read-only base checkpoints: a test
that needs to write next to a model copies the folder into its own `tmp_path` first.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

# Derived-file cache (compiled kernels, target lists) of this test run only: hermetic, and the
# user's ~/.cache is left alone. Subprocesses started by tests inherit it.
os.environ.setdefault("NEUROADA_CACHE_DIR", tempfile.mkdtemp(prefix="neuroada-test-cache-"))

# `fixtures/` is a top-level folder of the repository, not part of the installed package. Under
# `python -m pytest` the working directory is already importable; under a bare `pytest` it is not.
_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from fixtures.build import build_all  # noqa: E402


@pytest.fixture(scope="session")
def fixture_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> model folder, for every name in `fixtures.build.NAMES`."""
    return build_all(tmp_path_factory.mktemp("fixtures"))


@pytest.fixture(scope="session")
def lm_tok():
    """A byte-level BPE tokenizer (GPT-2-like, no prefix), trained on a few sentences."""
    from tests.datakit import _bpe_tokenizer

    return _bpe_tokenizer()


@pytest.fixture(scope="session")
def bos_tok():
    """The same BPE tokenizer with a ``<s>`` prefix (Llama-like)."""
    from tests.datakit import _bpe_tokenizer

    return _bpe_tokenizer(bos_prefix=True)


@pytest.fixture(scope="session")
def enc_tok():
    """A WordPiece tokenizer with ``[CLS]``/``[SEP]`` and token type ids (BERT-like)."""
    from tests.datakit import _wordpiece_tokenizer

    return _wordpiece_tokenizer()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``$NEUROADA_DATA`` (default ``../shared/data``); skipped when missing, unless ``CI=true``."""
    path = Path(os.environ.get("NEUROADA_DATA", _REPO_ROOT.parent / "shared" / "data"))
    if (
        not (path / "boolq" / "train.json").is_file()
        or not (path / "arc-easy" / "train.json").is_file()
    ):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"real data not found at {path} (set NEUROADA_DATA)")
        pytest.skip(f"real data not found at {path} (set NEUROADA_DATA)")
    return path


@pytest.fixture(scope="session")
def decoder_forms(fixture_models, tmp_path_factory):
    """name -> ``tests.genkit.Forms`` (index, random delta, merged folder, ONNX with past), built on first use."""
    from tests.genkit import forms_getter

    return forms_getter(fixture_models, tmp_path_factory.mktemp("forms"))
