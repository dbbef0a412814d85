#!/usr/bin/env bash
# On one lent GPU: judge what session 11 landed untimed (docs/persistent-decode.md, "What is
# left"). Prepare the timed tree first, here: `rm -rf _base && mkdir _base && git archive
# 343ad86 moebius | tar -x -C _base`, and pass carry=["_base"].
#   PART=1: every GPU kernel test, then batch 1 and 8 decode: the tree against _base (the
#           merge/q-k reorders), MOEBIUS_TOPK_ROWS=4, the GEMV with 1 and 2 warps a program,
#           DeepSeek-V2-Lite shapes against _base (the MLA kernel's reads before its wait).
#   PART=2: the sampler alone (bench.sampling), decode with temperature 1 with and without
#           MOEBIUS_FUSED_SAMPLING, the experts at prefill sizes (bench.moe_kernels: fused with
#           prefill tiles against grouped GEMM), prefill steps with and without
#           MOEBIUS_MOE_LARGE=fused.
# Each part fits one call (10 minutes); $OUT gets at most 8 JSON files.
source "$(dirname "$0")/gpu_common.sh"
S=$(dirname "$0")
if [ "${PART:-1}" = 1 ]; then
  TESTS=tests/model/test_gpu_kernels.py TEST_TIMEOUT=${TEST_TIMEOUT:-330} B="1 8" KT="" \
    AB="MOEBIUS_TOPK_ROWS=4;MOEBIUS_GEMV_WARPS=1 MOEBIUS_GEMV_SLAB=4096;MOEBIUS_GEMV_WARPS=2 MOEBIUS_GEMV_SLAB=8192" \
    BASE=$PWD/_base OUT=$OUT/qwen bash "$S/gpu_decode.sh" 2>&1 | grep -v "^NVIDIA\|UTC"
  PRESET=deepseek-v2-lite B="1 8" KT="" AB="MOEBIUS_PDL=1" BASE=$PWD/_base OUT=$OUT/dsv2 \
    bash "$S/gpu_decode.sh" 2>&1 | grep "^\[" | sed 's/^/[dsv2] /'
else
  timeout 120 python3 -m moebius.bench.sampling --batches 1 64 256 --out "$OUT/sampling.json" \
    2>&1 | quiet | tail -12; lap sampling
  TEMP=1 B="1 64 256" KT="" AB="MOEBIUS_FUSED_SAMPLING=1" OUT=$OUT/temp1 \
    bash "$S/gpu_decode.sh" 2>&1 \
    | grep "^\[" | sed 's/^/[temp1] /'
  timeout 200 python3 -m moebius.bench.moe_kernels --tokens 256 2048 8192 \
    --out "$OUT/moe_kernels.json" 2>&1 | quiet | tail -14; lap moe_kernels
  for v in grouped fused; do
    MOEBIUS_MOE_LARGE=$v timeout 150 python3 -m moebius.bench.decode --batches \
      --prefill 1x2048 16x512 --out "$OUT/prefill_$v.json" 2>&1 | quiet \
      | grep "^prefill" | sed "s/^/[$v] /"; lap "prefill $v"
  done
fi
