#!/usr/bin/env bash
# On a lent GPU machine: GPU tests, then decode figures of the engine and of transformers.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -m pytest -q -p no:cacheprovider -x tests/model/test_gpu_kernels.py 2>&1 | tail -25
python3 -m moebius.bench.decode --preset qwen3-30b-a3b --batches 1 8 16 32 64 128 256 \
  --out "$OUT/decode_qwen3_30b.json" 2>&1 | tee "$OUT/decode.log" | tail -12
if [ "${WITH_HF:-0}" = 1 ]; then
python3 -m moebius.bench.hf_baseline --preset qwen3-30b-a3b --batches 1 64 --new-tokens 8 \
  --out "$OUT/hf_qwen3_30b.json" 2>&1 | tail -4
fi
