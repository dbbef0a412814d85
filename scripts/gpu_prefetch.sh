#!/usr/bin/env bash
# On one lent GPU (~8 minutes): the L2 prefetches of model/triton_prefetch.py, checked then
# timed. Their GPU tests (bits unchanged), then batch 1 and 8 end to end with each prefetch
# alone (o and qkv in the first round only) and all three (and all three evict-last), in two
# alternated rounds against none
# (MOEBIUS_PREFETCH_DOWN / _O / _QKV / _LAST).
source "$(dirname "$0")/gpu_common.sh"
timeout 150 python3 -m pytest -q -x tests/model/test_gpu_kernels.py \
  -k "prefetch or self_routing or paged_decode or fused_experts" 2>&1 | tail -3; lap tests
run() {  # $1 tag; env passes through
  timeout 90 python3 -m moebius.bench.decode --batches 1 8 2>&1 \
    | quiet | grep -v '^{' | grep "^ *[18] " | sed "s/^/[$1] /"
}
for i in 1 2; do
  run "none$i"
  MOEBIUS_PREFETCH_DOWN=1 run "down$i"
  if [ $i = 1 ]; then
    MOEBIUS_PREFETCH_O=1 run "o$i"
    MOEBIUS_PREFETCH_QKV=1 run "qkv$i"
  fi
  MOEBIUS_PREFETCH_DOWN=1 MOEBIUS_PREFETCH_O=1 MOEBIUS_PREFETCH_QKV=1 run "all$i"
  MOEBIUS_PREFETCH_DOWN=1 MOEBIUS_PREFETCH_O=1 MOEBIUS_PREFETCH_QKV=1 MOEBIUS_PREFETCH_LAST=1 \
    run "all_last$i"
done
lap ab
