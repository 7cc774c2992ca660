#!/usr/bin/env bash
# One GPU call for the fused LM head: the float64 check at real sizes, then the
# benchmark against eager, torch.compile and Liger-Kernel. Everything lands in $OUT.
# Liger-Kernel is pure Python: a wheel in .whl/ (pip download liger-kernel
# --no-deps -d .whl; carry .whl to the GPU machine) is unpacked onto PYTHONPATH,
# nothing is installed. Without it the benchmark records Liger as absent.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/cggr_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
wheel=$(ls .whl/liger_kernel-*.whl 2>/dev/null | tail -n 1)
if [ -n "$wheel" ]; then
  python3 -m zipfile -e "$wheel" "$OUT/liger" && export PYTHONPATH="$OUT/liger${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv > "$OUT/nvidia_smi.txt" 2>&1
timeout "${CHECK_TIMEOUT:-240}" python3 benchmarks/check_fused_head_gpu.py --out "$OUT/check_fused_head.json" 2>&1 | tee "$OUT/check_fused_head.log"
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/bench_fused_head.py --out "$OUT/fused_head.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_fused_head.log"
rm -rf "$OUT/liger"
