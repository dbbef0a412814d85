#!/usr/bin/env bash
# On one lent GPU (session 6's kernels, off by default until this has run): kernel tests (both
# ways each), then batch-1/4 decode steps (Qwen3-30B-A3B shapes, random bf16, overlapped) with
# the defaults, with MOEBIUS_ARRIVE=1, and with MOEBIUS_ARRIVE=1 MOEBIUS_GEMV=1 (SLAB32K: also
# a 32K-element GEMV slab), and the older tree in BASE if given; then, with LADDER set, the
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
bench default "${B:-1 4}" "${KT:-1}" ""
MOEBIUS_ARRIVE=1 bench arrive "${B:-1 4}" "${KT:-1}" ""
MOEBIUS_ARRIVE=1 MOEBIUS_GEMV=1 bench arrive_gemv "${B:-1 4}" "${KT:-1}" ""
if [ -n "${SLAB32K:-}" ]; then
  MOEBIUS_ARRIVE=1 MOEBIUS_GEMV=1 MOEBIUS_GEMV_SLAB=32768 bench gemv32k 1 "" ""
fi
if [ -n "${BASE:-}" ]; then (cd "$BASE" && PYTHONPATH=$PWD bench base "${B:-1 4}" "" ""); fi
if [ -n "${LADDER:-}" ]; then
  TAIL=20 BENCH_TIMEOUT=240 bench ladder "$LADDER" "" "${PREFILL:-1x2048 16x512}"
fi
