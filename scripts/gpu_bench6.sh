#!/usr/bin/env bash
# On one lent GPU (session 6): the GPU kernel tests, then the issue-4 decode ladder (Qwen3-30B-A3B
# shapes, random bf16, overlapped steps) with kernel tables, and prefill. BASE=dir (a copy of an
# older tree's moebius/) runs the ladder there first, on the same card.
source "$(dirname "$0")/gpu_common.sh"
if [ -n "${TESTS:-}" ]; then
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:logging $TESTS 2>&1 \
    | grep -E "passed|failed|Error|error|assert |^E " | head -30; lap tests
fi
bench() {  # $1: tag, $2: batches
  timeout ${BENCH_TIMEOUT:-300} python3 -m moebius.bench.decode --preset qwen3-30b-a3b \
    --batches $2 --kernel-tables ${KT:-1} --prefill ${PREFILL:-} \
    --out "$OUT/decode_$1.json" 2>&1 | quiet | grep -v '^{' | tail -${TAIL:-40}
  lap "decode $1"
}
if [ -n "${BASE:-}" ]; then (cd "$BASE" && PYTHONPATH=$PWD bench base "${BASE_B:-1}"); fi
bench "${TAG:-s6}" "${B:-1 8 32 128 256}"
