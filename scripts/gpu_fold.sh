#!/usr/bin/env bash
# On one lent GPU (~6 minutes): the batch-1 router fold (model/router_fold.py). Its GPU tests
# (tokens of the unfolded path, the kernels it touches), then batch 1 and 8 with
# MOEBIUS_FOLD_ROUTER=0 and =1 in alternation, two rounds.
source "$(dirname "$0")/gpu_common.sh"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/model/test_gpu_kernels.py \
  -k "router_fold or self_routing or add_rms_norm or norm_routes or gemv_matches or cuda_graphs" 2>&1 \
  | tail -4; lap tests
[ -n "${MORE_TESTS:-}" ] && timeout 150 python3 -m pytest -q -p no:cacheprovider \
  tests/engine/test_penalties.py tests/engine/test_logit_rules.py 2>&1 | tail -4; lap more
run() {  # $1 tag; env passes through
  timeout 100 python3 -m moebius.bench.decode --batches 1 8 2>&1 \
    | quiet | grep -v '^{' | grep "^ *[18] " | sed "s/^/[$1] /"
}
for i in 1 2; do
  MOEBIUS_FOLD_ROUTER=0 run "unfolded$i"
  MOEBIUS_FOLD_ROUTER=1 run "folded$i"
done
lap ab
