#!/usr/bin/env bash
# The whole `afdserve bench` on a CUDA GPU (bf16; AFD over NCCL), in a few minutes.
# CPU-only machines: prints that no GPU is present and exits 0.
#   benchmarks/gpu_bench.sh [OUT_DIR] [extra afdserve bench options...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${1:-runs/bench-gpu}
shift || true
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_bench: no CUDA GPU present (torch.cuda.is_available() is False); skipping."
    exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
# Full grid; more timed steps than on CPU because GPU steps are short; longer attention contexts.
exec "$PY" -m afdserve bench --device cuda --dtype bfloat16 --out "$OUT" \
    --batches 1,8,32,64 --contexts 128,1024,4096 --steps 32 --warmup 4 \
    --attn-batch 32 --attn-contexts 128,1024,4096,16384 "$@"
