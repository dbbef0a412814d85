#!/usr/bin/env bash
# On one lent GPU (session 6): kernel tests, then batch-1..4 decode steps (Qwen3-30B-A3B shapes,
# random bf16, overlapped) for the older tree in BASE (if given) and for variants of this one
# (the weight-prefetching GEMV off, on, and at another slab size); then, with LADDER set, the
# issue-4 ladder and prefill with the defaults. $OUT gets the JSON.
source "$(dirname "$0")/gpu_common.sh"
if [ -n "${TESTS:-}" ]; then
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:logging $TESTS ${TESTK:+-k "$TESTK"} 2>&1 \
    | grep -E "passed|failed|Error|error|assert |^E " | head -30; lap tests
fi
bench() {  # $1 tag, $2 batches, $3 kernel-table batches, $4 prefill shapes; env passes through
  timeout ${BENCH_TIMEOUT:-150} python3 -m moebius.bench.decode --preset qwen3-30b-a3b \
    --batches $2 --kernel-tables $3 --prefill $4 --out "$OUT/decode_$1.json" 2>&1 | quiet \
    | grep -v '^{' | grep -v "^engine up\|^ *batch" | sed "s/^/[$1] /" | tail -${TAIL:-25}
  lap "$1"
}
bench gemv "${B:-1 4}" "${KT:-1}" ""
if [ -n "${BASE:-}" ]; then (cd "$BASE" && PYTHONPATH=$PWD bench base "${B:-1 4}" "${KT:-1}" ""); fi
MOEBIUS_GEMV=0 bench nogemv "${B:-1 4}" "" ""
[ -n "${SLAB32K:-}" ] && MOEBIUS_GEMV_SLAB=32768 bench gemv32k 1 "" ""
if [ -n "${LADDER:-}" ]; then
  TAIL=20 BENCH_TIMEOUT=240 bench ladder "$LADDER" "" "${PREFILL:-1x2048 16x512}"
fi
