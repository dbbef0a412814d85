#!/usr/bin/env bash
# On one lent GPU (session 3, third call): with PDL on, decode steps with the Triton GEMV
# (L2 prefetch of the weights before the wait) and with cuBLAS; every GPU test with the
# Triton GEMV; a batch-1 kernel profile.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
quiet() { grep -v "Warn\|warn\|softmax\|Inductor\|Cut an\|^ *$"; }
T0=$SECONDS; lap() { echo "[$1: $((SECONDS - T0)) s]"; }
date -u
for g in triton cublas; do
  MOEBIUS_GEMV=$g python3 -m moebius.bench.decode --preset qwen3-30b-a3b --batches 1 4 8 16 64 256 \
    --out "$OUT/decode_gemv_$g.json" 2>&1 | quiet | tail -7; lap "decode gemv=$g"
done
MOEBIUS_GEMV=triton python3 -m pytest -q -p no:logging tests/model/test_gpu_kernels.py 2>&1 \
  | grep -E "passed|failed|Error|assert " | head; lap "all gpu tests, gemv=triton"
MOEBIUS_GEMV=triton timeout 120 python3 -m moebius.bench.profile_step --layers 8 --batch 1 2>&1 \
  | grep -v "^-" | cut -c1-72,100-175 | quiet | tail -24 > "$OUT/profile.txt"; lap profile
cat "$OUT/profile.txt"
