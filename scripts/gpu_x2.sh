#!/usr/bin/env bash
# On two lent GPUs of one host (nvidia-h200-x2, session 4): the two-GPU tests, then TP2 vs EP2
# decode (the crossover), switch times at KV fill 0/50/90%, steps through a switch. $OUT.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
quiet() { grep -v "Warn\|warn\|softmax\|Inductor\|Cut an\|^ *$"; }
T0=$SECONDS; lap() { echo "[$1: $((SECONDS - T0)) s]"; }
date -u; nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader; nvidia-smi topo -m | head -4
timeout 240 python3 -m pytest -q -p no:logging -x tests/parallel/test_gpu_multirank.py 2>&1 \
  | grep -E "passed|failed|Error|error|assert " | head -20; lap "2-gpu tests"
EX=${EX:-allgather}
timeout 420 python3 -m moebius.bench.multirank --preset qwen3-30b-a3b --ranks 2 --ep-exchange $EX \
  --batches ${BATCHES:-1 4 16 64 256 1024 2048} --switch-fills ${FILLS:-0 0.5 0.9} \
  --through-switch ${THROUGH:-64 512} --out "$OUT/multirank_$EX.json" --plot "$OUT/crossover_$EX.png" \
  > "$OUT/multirank_$EX.log" 2>&1; echo "rc $?"
grep -v "^{" "$OUT/multirank_$EX.log" | quiet | tail -30; lap "multirank $EX"
