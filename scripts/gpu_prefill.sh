#!/usr/bin/env bash
# On one lent GPU: the prefill kernels' GPU tests, the prefill kernel bench (attention tile
# sweep, gated activation; moebius.bench.prefill_kernels) and the engine's prefill steps with
# their kernel tables (PREFILL shapes). $OUT gets the JSON.
source "$(dirname "$0")/gpu_common.sh"
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:logging tests/model/test_gpu_kernels.py \
  -k "${TESTK:-qk_norm or paged_prefill or gated or grouped or pair_sort}" 2>&1 \
  | grep -E "passed|failed|Error|error|assert |^E " | head -30; lap tests
if [ -z "${SKIP_SWEEP:-}" ]; then
  timeout ${SWEEP_TIMEOUT:-300} python3 -m moebius.bench.prefill_kernels \
    --out "$OUT/prefill_kernels.json" 2>&1 | quiet | tail -40; lap kernels
fi
timeout ${BENCH_TIMEOUT:-240} python3 -m moebius.bench.decode --preset qwen3-30b-a3b --batches \
  --prefill ${PREFILL:-1x2048 16x512} --prefill-kernel-tables ${PREFILL:-1x2048 16x512} \
  --out "$OUT/prefill.json" 2>&1 | quiet | grep -v '^{' | tail -40; lap prefill
