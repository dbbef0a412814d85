#!/usr/bin/env bash
# Session 5 on nvidia-h200-x2: overlapped scheduling on two ranks. The 2-GPU tests (overlap on
# by default on CUDA), then TP2 and EP2 decode with async scheduling off and on. $OUT.
source "$(dirname "$0")/gpu_common.sh"
for mode in ${MODES:-off on}; do
  timeout ${MR_TIMEOUT:-200} python3 -m moebius.bench.multirank --ranks 2 --preset qwen3-30b-a3b \
    --layouts ${LAYOUTS:-tp ep} --batches ${BATCHES:-1 16 64 256} --async-scheduling $mode \
    ${MR_ARGS:-} --out "$OUT/multirank_async_$mode.json" > "$OUT/multirank_async_$mode.log" 2>&1
  echo "rc $?"; grep -v "^{" "$OUT/multirank_async_$mode.log" | quiet | grep -v "^\[" | tail -${MR_TAIL:-10}
  lap "async=$mode"
done
if [ -n "${TESTS:-}" ]; then
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:logging $TESTS 2>&1 \
    | grep -E "passed|failed|Error|error|assert |^E " | head -30; lap tests
fi
