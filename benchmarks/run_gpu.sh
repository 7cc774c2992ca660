#!/usr/bin/env bash
# One GPU call: the kernel's correctness check, the sync-free / CUDA-graph check
# of the whole CGGR step, then the benchmark (with the launch-config sweep and
# the selection timings). Everything lands in $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/cggr_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv > "$OUT/nvidia_smi.txt" 2>&1
timeout 240 python3 benchmarks/check_token_stats_gpu.py --out "$OUT/check_token_stats.json" 2>&1 | tee "$OUT/check.log"
timeout 120 python3 benchmarks/check_pipeline_gpu.py --out "$OUT/check_pipeline_gpu.json" 2>&1 | tee "$OUT/check_pipeline.log"
timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/bench_token_stats.py --out "$OUT/token_stats.json" --asm-dir "$OUT" ${BENCH_ARGS:---sweep --selection} 2>&1 | tee "$OUT/bench.log"
