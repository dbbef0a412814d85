#!/usr/bin/env bash
# On a lent GPU machine: GPU tests, then decode figures of the engine and of transformers.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -m pytest -q -p no:cacheprovider tests/model/test_gpu_kernels.py 2>&1 | tail -15
python3 -m moebius.bench.decode --preset qwen3-30b-a3b --batches 1 16 64 256 \
  --out "$OUT/decode_qwen3_30b.json" 2>&1 | tee "$OUT/decode.log" | tail -12
python3 -m moebius.bench.hf_baseline --preset qwen3-30b-a3b --batches 1 64 --new-tokens 8 \
  --out "$OUT/hf_qwen3_30b.json" 2>&1 | tail -4
