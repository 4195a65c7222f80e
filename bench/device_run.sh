#!/usr/bin/env bash
# One prepared run on a CUDA machine (the device tool): GPU benchmark of the bypass, then the
# CPU benchmarks pinned to 2 cores (taskset) so they run without other load. Results in $OUT.
# Usage: bash bench/device_run.sh [gpu|cpu|all]
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bench-out}; mkdir -p "$OUT"
what=${1:-all}
{ nproc; python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; } 2>&1 | tee "$OUT/env.txt"
if [ "$what" = gpu ] || [ "$what" = all ]; then
  timeout 330 python3 bench/bench_gpu.py --out "$OUT/gpu.md" 2>&1 | tail -40
fi
if [ "$what" = cpu ] || [ "$what" = all ]; then
  timeout 240 taskset -c 0,1 python3 bench/bench_index.py --out "$OUT/index.md" 2>&1 | tail -15
  timeout 200 taskset -c 0,1 python3 bench/bench_merge.py --out "$OUT/merge.md" 2>&1 | tail -12
fi
