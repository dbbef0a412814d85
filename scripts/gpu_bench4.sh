#!/usr/bin/env bash
# On one lent GPU (session 3): GPU kernel tests (Triton GEMV on), the GEMV against cuBLAS,
# decode steps with cuBLAS and with the Triton GEMV, a batch-1 kernel profile. Outputs $OUT.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
quiet() { grep -v "Warn\|warn\|softmax\|Inductor\|Cut an\|^ *$"; }
T0=$SECONDS; lap() { echo "[$1: $((SECONDS - T0)) s]"; }
date -u; nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
MOEBIUS_GEMV=triton python3 -m pytest -q -x -p no:logging tests/model/test_gpu_kernels.py 2>&1 \
  | grep -E "passed|failed|Error|assert " | head; lap tests
python3 -m moebius.bench.gemv --out "$OUT/gemv.json" 2>&1 | quiet | tail -17; lap gemv
for g in cublas triton; do
  MOEBIUS_GEMV=$g python3 -m moebius.bench.decode --preset qwen3-30b-a3b --batches 1 4 8 64 256 \
    --out "$OUT/decode_$g.json" 2>&1 | quiet | tail -6; lap "decode $g"
done
MOEBIUS_GEMV=triton timeout 120 python3 -m moebius.bench.profile_step --layers 8 --batch 1 2>&1 \
  | grep -v "^-" | cut -c1-72,160-175 | quiet | tail -30 > "$OUT/profile.txt"; lap profile
cat "$OUT/profile.txt"
