#!/usr/bin/env bash
# On one lent GPU (session 5): the overlapped-scheduling tests and the GPU kernel tests, then
# decode steps with async scheduling off and on (Qwen3-30B-A3B shapes, random bf16). $OUT.
source "$(dirname "$0")/gpu_common.sh"
B=${B:-1 4 8 16 32 64 128 256}
for mode in ${MODES:-off on}; do
  timeout ${BENCH_TIMEOUT:-200} python3 -m moebius.bench.decode --preset qwen3-30b-a3b --batches $B \
    --async-scheduling $mode --out "$OUT/decode_async_$mode.json" 2>&1 | quiet | tail -11
  lap "decode async=$mode"
done
if [ -n "${TESTS:-}" ]; then
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:logging $TESTS 2>&1 \
    | grep -E "passed|failed|Error|error|assert |^E " | head -30; lap tests
fi
