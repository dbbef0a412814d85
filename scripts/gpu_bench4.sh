#!/usr/bin/env bash
# On one lent GPU (session 3): every GPU test (PDL on, the default on Hopper), decode steps
# with programmatic dependent launch off and on, prefill, DeepSeek-V2-Lite shapes. $OUT.
source "$(dirname "$0")/gpu_common.sh"
python3 -m pytest -q -p no:logging tests/model/test_gpu_kernels.py 2>&1 \
  | grep -E "passed|failed|Error|assert " | head; lap "gpu tests"
B="1 4 8 16 32 64 128 256"
MOEBIUS_PDL=0 python3 -m moebius.bench.decode --preset qwen3-30b-a3b --batches $B \
  --out "$OUT/decode_pdl0.json" 2>&1 | quiet | tail -9; lap "decode pdl=0"
python3 -m moebius.bench.decode --preset qwen3-30b-a3b --batches $B --prefill 1x2048 16x512 \
  --out "$OUT/decode.json" 2>&1 | quiet | tail -12; lap "decode pdl=1"
python3 -m moebius.bench.decode --preset deepseek-v2-lite --batches 1 16 64 256 \
  --out "$OUT/decode_deepseek.json" 2>&1 | quiet | tail -5; lap "deepseek"
