#!/usr/bin/env bash
# On one lent GPU: the GPU kernel tests (TESTS, TESTK: pytest -k), the command in EXTRA (a kernel
# bench), then decode steps (Qwen3-30B-A3B shapes, random bf16, overlapped) at batches B with
# the defaults and with each environment in AB (";" between them; default MOEBIUS_GEMV=0: cuBLAS
# for the one-token projections), kernel tables at KT (default 1; KT="" none), and the older
# tree in BASE if given; then, with LADDER set, the issue-4 ladder and prefill (PREFILL) with
# the defaults (PKT: prefill shapes whose kernels are tabled; LADDER_TAIL lines of it shown;
# TEMP: decode with that sampling temperature instead of greedy; PRESET: the model shapes).
# $OUT gets the JSON. Session 10 (H100): `TESTS=tests/model/test_gpu_kernels.py
# B="1" AB="MOEBIUS_SELF_ROUTE=0" LADDER="1 8 32 128 256"` ran in 180 s.
source "$(dirname "$0")/gpu_common.sh"
if [ -n "${TESTS:-}" ]; then
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:logging $TESTS ${TESTK:+-k "$TESTK"} 2>&1 \
    | grep -E "passed|failed|Error|error|assert |^E " | head -30; lap tests
fi
bench() {  # $1 tag, $2 batches, $3 kernel-table batches, $4 prefill shapes; env passes through
  timeout ${BENCH_TIMEOUT:-150} python3 -m moebius.bench.decode --preset ${PRESET:-qwen3-30b-a3b} \
    --batches $2 --kernel-tables $3 --prefill $4 ${PKT:+--prefill-kernel-tables $PKT} \
    ${TEMP:+--temperature $TEMP} \
    --out "$OUT/decode_$1.json" 2>&1 | quiet \
    | grep -v '^{' | grep -v "^engine up\|^ *batch" | sed "s/^/[$1] /" | tail -${TAIL:-25}
  lap "$1"
}
if [ -n "${EXTRA:-}" ]; then
  timeout ${EXTRA_TIMEOUT:-200} bash -c "$EXTRA" 2>&1 | quiet | tail -${EXTRA_TAIL:-30}; lap extra
fi
bench default "${B:-1 2 4}" "${KT-1}" ""
IFS=';' read -ra ALTS <<< "${AB:-MOEBIUS_GEMV=0}"
for i in "${!ALTS[@]}"; do
  echo "[ab$i] ${ALTS[$i]}"; (export ${ALTS[$i]}; bench "ab$i" "${B:-1 2 4}" "${KT-1}" "")
done
if [ -n "${BASE:-}" ]; then (cd "$BASE" && PYTHONPATH=$PWD bench base "${B:-1 2 4}" "" ""); fi
if [ -n "${LADDER:-}" ]; then
  TAIL=${LADDER_TAIL:-20} BENCH_TIMEOUT=${LADDER_TIMEOUT:-240} bench ladder "$LADDER" "" "${PREFILL:-1x2048 16x512}"
fi
