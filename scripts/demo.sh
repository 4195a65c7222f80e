#!/usr/bin/env bash
# Set up ./.venv and run the main job end to end on the built-in default. Extra arguments go to
# `neuroada-tools demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/neuroada-tools demo "$@"
