#!/usr/bin/env bash
# On one lent GPU (~7 minutes; an H200 adds the issue-4 ladder): the batch-1 A/Bs still
# untimed. Their GPU tests, then batch 1 and 8 in alternation: the defaults; the projections'
# GEMVs in shared memory (MOEBIUS_GEMV_SMEM=1, =o for o alone; model/gluon_gemv.py), with
# every kernel on the largest shared-memory carve-out (MOEBIUS_SMEM_CARVEOUT), and with down on
# 2 stages too; the router fold (MOEBIUS_FOLD_ROUTER, model/router_fold.py), also with o in
# shared memory. A second round where the call has time (ROUNDS_S), then each variant's mean
# against the defaults. env: TESTS_K (narrower tests), BUDGET_S (kernel tables).
source "$(dirname "$0")/gpu_common.sh"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/model/test_gpu_kernels.py -k \
  "${TESTS_K:-shared_memory or router_fold or self_routing or norm_routes or gemv_matches or cuda_graphs}" \
  2>&1 | tail -6
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/guided/test_guided_engine.py -k cuda \
  2>&1 | tail -3; lap tests
run() {  # $1 tag; env passes through
  timeout 100 python3 -m moebius.bench.decode --batches 1 8 2>&1 \
    | quiet | grep -v '^{' | grep "^ *[18] " | sed "s/^/[$1] /" | tee -a "$OUT/ab.txt"
}
round() {  # $1 round number
  run "default$1"
  MOEBIUS_GEMV_SMEM=1 run "smem$1"
  MOEBIUS_GEMV_SMEM=o run "smem_o$1"
  MOEBIUS_GEMV_SMEM=1 MOEBIUS_SMEM_CARVEOUT=1 run "smem_carve$1"
  # down's programs on 2 stages (20 KB each, not 61): two of them and one q/k/v program fit
  MOEBIUS_GEMV_SMEM=1 MOEBIUS_SMEM_CARVEOUT=1 MOEBIUS_MOE_LAUNCH_SMALL=4,4,4,2 run "smem_down2_$1"
  MOEBIUS_FOLD_ROUTER=1 run "fold$1"
  MOEBIUS_FOLD_ROUTER=1 MOEBIUS_GEMV_SMEM=o run "fold_smem_o$1"  # R·W_o as o's extra rows
  lap "round $1"
}
round 1
# On an H200 (the issue's card; none since session 9) the issue-4 ladder with the defaults.
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  timeout 200 python3 -m moebius.bench.decode --batches 1 8 32 128 256 --prefill 1x2048 16x512 \
    --out "$OUT/ladder.json" 2>&1 | quiet | grep -v '^{' | tail -12 | sed "s/^/[ladder] /"
  lap ladder
fi
[ $((SECONDS - T0)) -lt ${ROUNDS_S:-420} ] && round 2
# Each variant's mean ms/step over the rounds, and its change against the defaults' (the
# spread of one variant between rounds is the noise to beat, ~0.02 ms at batch 1 on H100).
awk '{t = $1; gsub(/[][]/, "", t); sub(/_?[0-9]+$/, "", t); k = t " b" $2
      if (!(k in n)) {lo[k] = $3; hi[k] = $3}
      if ($3 < lo[k]) lo[k] = $3
      if ($3 > hi[k]) hi[k] = $3
      sum[k] += $3; n[k]++}
     END {for (k in sum) {split(k, p, " "); m = sum[k] / n[k]; d = sum["default " p[2]] / n["default " p[2]]
          printf "[mean] %-16s %-4s %7.3f ms (%+.3f against default; rounds %.2f-%.2f)\n", p[1], p[2], m, m - d, lo[k], hi[k]}}' \
  "$OUT/ab.txt" | sort -b -k3,3 -k4,4n
# Kernel tables of one batch-1 replay, PDL off (each kernel's own time), default and with the
# shared-memory GEMVs (where the call has time left).
for s in 0 1; do
  [ $((SECONDS - T0)) -lt ${BUDGET_S:-470} ] || break
  MOEBIUS_PDL=0 MOEBIUS_GEMV_SMEM=$s timeout 60 python3 -m moebius.bench.decode --batches 1 \
    --kernel-tables 1 2>&1 | quiet | grep -v '^{' | tail -14 | sed "s/^/[smem$s] /"
done
lap profile
