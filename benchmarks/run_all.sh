#!/usr/bin/env bash
# Every CPU benchmark of the project, one after the other, into runs/ (about 90 minutes on
# 2 cores; the first vs_vllm run also installs vLLM's CPU build into its own venv). Run it on an
# otherwise idle machine: `bash benchmarks/run_all.sh`.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p runs
$PY -m afdserve bench --no-afd --out runs/bench 2>&1 | tee runs/bench.log
$PY -m afdserve bench --no-afd --no-peer --no-attention --batches 1 --contexts 128 --quantization fp8 \
    --out runs/bench_fp8 2>&1 | tee runs/bench_fp8.log
$PY benchmarks/vs_vllm.py --dtypes bfloat16,float32 --batches 1,8,32 --contexts 128,1024 --rounds 2 \
    --json runs/vs_vllm.json 2>&1 | tee runs/vs_vllm.log
$PY benchmarks/batch1_roofline_bench.py 2>&1 | tee runs/batch1_roofline_bench.log
$PY benchmarks/kv_cache_attention_bench.py --shuffled 2>&1 | tee runs/kv_cache_attention_bench.log
$PY benchmarks/kernel_bench.py --json runs/kernel_bench.json 2>&1 | tee runs/kernel_bench.log
$PY benchmarks/afd_bench.py --json runs/afd_bench.json 2>&1 | tee runs/afd_bench.log
for b in 4 16 32; do
    $PY benchmarks/sim_vs_measured.py --batch "$b" --repeats 3 --json > "runs/sim_vs_measured_b$b.json" 2>> runs/sim_vs_measured.log
done
$PY benchmarks/serve_bench.py --clients 200 --requests 400 --bad-fraction 0.1 --max-tokens 16 \
    --json runs/serve_bench.json 2>&1 | tee runs/serve_bench.log
$PY benchmarks/chaos_soak.py --json runs/chaos_soak.json 2>&1 | tee runs/chaos_soak.log
