#!/usr/bin/env bash
# On one lent GPU (session 3, second call): the new kernels' tests, decode steps without and
# with programmatic dependent launch (MOEBIUS_PDL), then every GPU test with PDL on.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
quiet() { grep -v "Warn\|warn\|softmax\|Inductor\|Cut an\|^ *$"; }
T0=$SECONDS; lap() { echo "[$1: $((SECONDS - T0)) s]"; }
date -u
python3 -m pytest -q -x -p no:logging tests/model/test_gpu_kernels.py -k "route or add_rms or gemv" \
  2>&1 | grep -E "passed|failed|Error|assert " | head; lap "new kernel tests"
for pdl in 0 1; do
  MOEBIUS_PDL=$pdl python3 -m moebius.bench.decode --preset qwen3-30b-a3b --batches 1 4 8 16 64 256 \
    --out "$OUT/decode_pdl$pdl.json" 2>&1 | quiet | tail -7; lap "decode pdl=$pdl"
done
MOEBIUS_PDL=1 python3 -m pytest -q -p no:logging tests/model/test_gpu_kernels.py 2>&1 \
  | grep -E "passed|failed|Error|assert " | head; lap "all gpu tests, pdl=1"
