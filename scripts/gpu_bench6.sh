#!/usr/bin/env bash
# On one lent GPU (session 6): the GPU kernel and overlap tests, then the issue-4 decode ladder
# (Qwen3-30B-A3B shapes, random bf16, overlapped steps) with a batch-1 kernel table, and prefill.
source "$(dirname "$0")/gpu_common.sh"
if [ -n "${TESTS:-}" ]; then
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:logging $TESTS 2>&1 \
    | grep -E "passed|failed|Error|error|assert |^E " | head -30; lap tests
fi
timeout ${BENCH_TIMEOUT:-300} python3 -m moebius.bench.decode --preset qwen3-30b-a3b \
  --batches ${B:-1 8 32 128 256} --kernel-tables ${KT:-1} --prefill ${PREFILL:-} \
  --out "$OUT/decode_${TAG:-s6}.json" 2>&1 | quiet | tail -${TAIL:-40}
lap decode
