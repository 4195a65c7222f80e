#!/usr/bin/env bash
# Set up ./.venv and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The compiled kernels must build here: a failed build is an error, not a silent torch fallback.
export NEUROADA_NATIVE=${NEUROADA_NATIVE:-1}
exec .venv/bin/python -m pytest -q "$@"
