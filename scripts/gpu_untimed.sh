#!/usr/bin/env bash
# On one lent GPU, one call (~6 minutes): judge what session 12 landed untimed (BENCHMARKS.md
# "Session 12"). Prepare here first: `rm -rf _base _mla && mkdir _base _mla && git archive
# 343ad86 moebius | tar -x -C _base && cp -r moebius _mla/` and put `pdl_launch_next(PDL)`
# back as the first line of `_mla/moebius/model/triton_mla.py`'s `_mla_split_kernel` (import
# it there too); pass carry=["_base", "_mla"].
#   1. The GPU kernel tests (merge_splits' 128-column programs, the sort-free filtered draw).
#   2. DeepSeek-V2-Lite batch 1 and 8: this tree (merge_splits, MLA without an early launch)
#      against _mla (with it) and _base (343ad86: 9.80 ms at batch 8, session 12).
#   3. The sampler: eager, fused draw, sort-free filter (bench.sampling); turn
#      MOEBIUS_FUSED_FILTER on in model/sampler.py if faster with the same tokens.
#   4. The Qwen3-30B-A3B ladder and prefill (the issue-4 figures) if an H200 came.
source "$(dirname "$0")/gpu_common.sh"
timeout 240 python3 -m pytest -q -p no:logging tests/model/test_gpu_kernels.py 2>&1 \
  | grep -E "passed|failed|Error|error|assert |^E " | head -30; lap tests
dsv() {  # $1 tree, $2 tag
  (cd "$1" && PYTHONPATH=$PWD timeout 100 python3 -m moebius.bench.decode --preset \
    deepseek-v2-lite --batches 1 8 --kernel-tables 8 --prefill --out "$OUT/dsv_$2.json" 2>&1 \
    | quiet | grep -v '^{' | grep "merge\|mla\|^ *[18] " | sed "s/^/[$2] /"); lap "$2"
}
dsv "$PWD" head
[ -d _mla ] && dsv "$PWD/_mla" launch
[ -d _base ] && dsv "$PWD/_base" base
timeout 100 python3 -m moebius.bench.sampling --batches 1 64 256 --out "$OUT/sampling.json" \
  2>&1 | quiet | tail -14; lap sampling
# The ladder only on an H200 (session 11 has it on an H100) or with LADDER=1.
if [ -n "${LADDER:-}" ] || nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  timeout 240 python3 -m moebius.bench.decode --batches 1 8 32 128 256 --prefill 1x2048 16x512 \
    --out "$OUT/ladder.json" 2>&1 | quiet | grep -v '^{' | tail -12 | sed "s/^/[ladder] /"
  lap ladder
fi
