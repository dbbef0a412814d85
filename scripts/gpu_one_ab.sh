#!/usr/bin/env bash
# On one lent GPU (~4 minutes; ~8 on an H200): batch 1's expert launches end to end, then the
# prefill down kernel's tiles (`bench.moe_kernels --down-sweep 2048`). Session 13's sweep
# (`bench.moe_kernels --one-sweep`, H100) had 6 pipeline stages 5 µs a layer faster than 4 in
# isolation, for the gate/up or the down kernel, yet its best pair lost 0.07 ms a step in the
# engine; here each change alone, in alternation with the defaults (MOEBIUS_MOE_LAUNCH_SMALL /
# MOEBIUS_MOE_TILES_SMALL). On an H200 (or with LADDER=1) first the issue-4 ladder and the sweep.
source "$(dirname "$0")/gpu_common.sh"
if [ -n "${LADDER:-}" ] || nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  timeout 240 python3 -m moebius.bench.decode --batches 1 8 32 128 256 --prefill 1x2048 16x512 \
    --out "$OUT/ladder.json" 2>&1 | quiet | grep -v '^{' | tail -12 | sed "s/^/[ladder] /"
  lap ladder
  timeout 100 python3 -m moebius.bench.moe_kernels --one-sweep --out "$OUT/one_sweep.json" \
    2>&1 | quiet | grep "best\|floor"; lap sweep
fi
run() {  # $1 tag; env passes through
  timeout 90 python3 -m moebius.bench.decode --batches 1 8 2>&1 \
    | quiet | grep -v '^{' | grep "^ *[18] " | sed "s/^/[$1] /"
}
for i in 1 2; do
  run "default$i"
  MOEBIUS_MOE_LAUNCH_SMALL=4,6,4,4 run "w13_6stages$i"
  MOEBIUS_MOE_LAUNCH_SMALL=4,4,4,6 run "w2_6stages$i"
  MOEBIUS_MOE_TILES_SMALL=32,256,64,128 MOEBIUS_MOE_LAUNCH_SMALL=2,4,4,4 run "w13_32x256_2w$i"
done
lap ab
# The prefill down kernel's tiles at 2,048 tokens (16,384 pairs: the fused experts' largest).
timeout 150 python3 -m moebius.bench.moe_kernels --down-sweep 2048 --out "$OUT/down_sweep.json" \
  2>&1 | quiet | grep -v "TFLOP/s) err"; lap down
