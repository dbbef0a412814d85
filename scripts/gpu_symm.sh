#!/usr/bin/env bash
# Session 5 on nvidia-h200-x2: the symmetric-memory all-reduce. Its kernel against NCCL by
# message size (and exactness), the 2-GPU tests with it on, then TP2 decode with it off and on.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$SECONDS; lap() { echo "[$1: $((SECONDS - T0)) s]"; }
quiet() { grep -v "Warn\|warn\|softmax\|Inductor\|Cut an\|^ *$\|TCPStore\|frame #\|Exception raised\|should dump"; }
date -u; nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
[ -n "${NO_AR:-}" ] || timeout 150 python3 -m moebius.bench.allreduce --ranks 2 --out "$OUT/allreduce_h200x2.json" 2>&1 | quiet | tail -14
lap allreduce
for sym in ${SYMM:-0 1}; do
  MOEBIUS_SYMM_ALLREDUCE=$sym timeout ${MR_TIMEOUT:-200} python3 -m moebius.bench.multirank --ranks 2 \
    --preset qwen3-30b-a3b --layouts ${LAYOUTS:-tp} --batches ${BATCHES:-1 4 16 64 256} \
    ${MR_ARGS:-} --out "$OUT/multirank_symm$sym.json" > "$OUT/multirank_symm$sym.log" 2>&1; echo "rc $?"
  grep -v "^{" "$OUT/multirank_symm$sym.log" | quiet | grep -v "^\[" | tail -${MR_TAIL:-14}; lap "symm=$sym"
done
if [ -n "${TESTS:-}" ]; then
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:logging $TESTS 2>&1 | grep -E "passed|failed|Error|error|assert |^E " | head -30
  lap tests
fi
