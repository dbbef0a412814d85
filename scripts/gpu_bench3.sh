#!/usr/bin/env bash
# On one lent GPU (session 2): GPU kernel tests, expert kernels alone, decode + prefill of the
# Qwen3-30B-A3B-shaped model, a batch-1 kernel profile. Outputs under $OUT.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
quiet() { grep -v "Warn\|warn\|softmax\|Inductor\|Cut an\|^ *$"; }
date -u
python3 -m pytest -q -p no:logging tests/model/test_gpu_kernels.py 2>&1 | grep -E "passed|failed|Error|assert " | head
python3 -m moebius.bench.moe_kernels --tokens 1 2 4 8 64 256 --out "$OUT/moe_kernels.json" 2>&1 | quiet | tail -7
python3 -m moebius.bench.decode --preset qwen3-30b-a3b --batches 1 4 8 16 32 64 128 256 \
  --prefill 1x2048 16x512 --out "$OUT/decode.json" 2>&1 | quiet | tail -12
timeout 120 python3 -m moebius.bench.profile_step --layers 8 --batch 1 --prefill 1x2048 2>&1 \
  | grep -v "^-" | cut -c1-72,160-175 | quiet | tail -52 > "$OUT/profile.txt"
