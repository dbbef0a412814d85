#!/usr/bin/env bash
# On one lent GPU: prefill figures, the expert-locality mechanism, a kernel profile.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m moebius.bench.decode --preset qwen3-30b-a3b --batches --prefill 1x2048 16x512 \
  --out "$OUT/prefill.json" 2>&1 | grep -E "prefill|Error|error" | tail -6
python3 -m moebius.bench.expert_locality --preset qwen3-30b-a3b --batch 64 \
  --distinct 8 16 32 64 128 --out "$OUT/locality.json" 2>&1 | tail -8
python3 -m moebius.bench.profile_step --layers 8 --batch 1 64 > "$OUT/profile.txt" 2>&1
grep -A 24 "=== batch" "$OUT/profile.txt" | cut -c1-150 | head -60
