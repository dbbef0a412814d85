#!/usr/bin/env bash
# On one lent GPU (~5 minutes; ~9 on an H200): the batch-1 router fold (model/router_fold.py).
# Its GPU tests (tokens of the unfolded path, the kernels it touches), then batch 1 and 8 with
# MOEBIUS_FOLD_ROUTER=0 and =1 (the o share split or as more rows) in alternation, two rounds;
# env: MORE_TESTS=1 (penalty/logit CUDA tests), TESTS_K (narrower tests), BUDGET_S (tables).
source "$(dirname "$0")/gpu_common.sh"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/model/test_gpu_kernels.py \
  -k "${TESTS_K:-router_fold or self_routing or add_rms_norm or norm_routes or gemv_matches or cuda_graphs}" 2>&1 \
  | tail -4; lap tests
[ -n "${MORE_TESTS:-}" ] && timeout 150 python3 -m pytest -q -p no:cacheprovider \
  tests/engine/test_penalties.py tests/engine/test_logit_rules.py 2>&1 | tail -4; lap more
run() {  # $1 tag; env passes through
  timeout 100 python3 -m moebius.bench.decode --batches 1 8 2>&1 \
    | quiet | grep -v '^{' | grep "^ *[18] " | sed "s/^/[$1] /"
}
for i in 1 2; do
  MOEBIUS_FOLD_ROUTER=0 run "unfolded$i"
  MOEBIUS_FOLD_ROUTER=1 MOEBIUS_FOLD_SPLIT=1 run "fold_split$i"
  MOEBIUS_FOLD_ROUTER=1 MOEBIUS_FOLD_SPLIT=0 run "fold_rows$i"
done
lap ab
# On an H200 (the issue's card; none since session 9) the issue-4 ladder with the defaults too.
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  timeout 240 python3 -m moebius.bench.decode --batches 1 8 32 128 256 --prefill 1x2048 16x512 \
    --out "$OUT/ladder.json" 2>&1 | quiet | grep -v '^{' | tail -12 | sed "s/^/[ladder] /"
  lap ladder
fi
# Kernel tables of one batch-1 replay, PDL off (each kernel's own time), unfolded and folded
# (where the call has time left).
for f in 0 1; do
  [ $((SECONDS - T0)) -lt ${BUDGET_S:-330} ] || break
  MOEBIUS_PDL=0 MOEBIUS_FOLD_ROUTER=$f timeout 100 python3 -m moebius.bench.decode --batches 1 \
    --kernel-tables 1 2>&1 | quiet | grep -v '^{' | tail -14 | sed "s/^/[fold$f] /"
done
lap profile
