#!/usr/bin/env bash
# The one prepared run for a GPU machine (the device tool), under 8 minutes: the CUDA correctness
# checks (the bypass on CUDA, the Triton kernels compiled against the torch reference), then the
# GPU benchmark (one layer at LLaMA-7B shapes, a whole step of a 1B-shaped Llama: frozen, NeuroAda
# with the Triton kernels, LoRA r=8, the authors' scatter_add, mask-based dense gradients).
# Tables and logs go to $OUT.  Usage: bash bench/device_check.sh [check|bench|all]
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NEUROADA_KERNELS=auto
OUT=${OUT:-/tmp/bench-out}; mkdir -p "$OUT"
what=${1:-all}
PY=${PY:-python3}
{ nproc; $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"; $PY -c "import triton; print('triton', triton.__version__)"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; } 2>&1 | tee "$OUT/env.txt"
status=0
if [ "$what" = check ] || [ "$what" = all ]; then
  timeout 120 $PY bench/cuda_check.py 2>&1 | tee "$OUT/cuda_check.txt" | tail -15 || status=1
  timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_kernels_backend.py 2>&1 \
    | tee "$OUT/triton_tests.txt" | tail -5 || status=1
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout 300 $PY bench/bench_gpu.py --out "$OUT/gpu.md" 2>&1 | tail -40 || status=1
fi
exit $status
