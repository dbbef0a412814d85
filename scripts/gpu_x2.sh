#!/usr/bin/env bash
# On two lent GPUs of one host (nvidia-h200-x2, session 4): the two-GPU tests, then TP2 vs EP2
# decode (the crossover), switch times at KV fill 0/50/90%, steps through a switch, and
# DeepSeek-V2-Lite's TP2 vs EP2 sweep. Sections by $PARTS (default: tests qwen deepseek). $OUT.
source "$(dirname "$0")/gpu_common.sh"
PARTS=${PARTS:-tests qwen deepseek}
has() { [[ " $PARTS " == *" $1 "* ]]; }
if has tests; then
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:logging ${TESTS:-tests/parallel/test_gpu_multirank.py} \
    ${EXTRA_TESTS:-} 2>&1 | grep -E "passed|failed|Error|error|assert |^E " | head -30; lap "2-gpu tests"
fi
mr() {  # name, then multirank arguments
  local name=$1; shift
  timeout ${MR_TIMEOUT:-400} python3 -m moebius.bench.multirank --ranks 2 --out "$OUT/$name.json" \
    --plot "$OUT/$name.png" "$@" > "$OUT/$name.log" 2>&1; echo "rc $?"
  grep -v "^{" "$OUT/$name.log" | quiet | tail -32; lap "$name"
}
has qwen && mr multirank_qwen_allgather --preset qwen3-30b-a3b \
  --batches ${BATCHES:-1 4 16 64 256 1024 2048} --switch-fills ${FILLS:-0 0.5 0.9} \
  --through-switch ${THROUGH:-64 512}
has alltoall && mr multirank_qwen_alltoall --preset qwen3-30b-a3b --ep-exchange alltoall \
  --layouts ep --batches 1 16 64 256 1024 2048
has switch && mr multirank_qwen_switch --preset qwen3-30b-a3b --batches ${SW_BATCHES:-2048} \
  --switch-fills ${FILLS:-0.5} --through-switch ${THROUGH:-64}
if has transport && [ -f moebius/bench/switch_transport.py ]; then
  timeout 200 python3 -m moebius.bench.switch_transport --preset qwen3-30b-a3b \
    --out "$OUT/switch_transport.json" 2>&1 | quiet | tail -15; lap "transport"
fi
if has rollout; then  # issue 6: static TP, static EP, auto on one RL rollout
  timeout ${RO_TIMEOUT:-330} python3 -m moebius.bench.harness --preset qwen3-30b-a3b --ranks 2 \
    --workload rollout --num-prompts ${RO_PROMPTS:-2048} --prompt-mean 256 --output-mean 512 \
    --output-cap 2048 --auto-start ep --profile results/profile_h200x2_qwen3_30b.json \
    --out "$OUT/rollout_qwen.json" > "$OUT/rollout_qwen.log" 2>&1; echo "rc $?"
  grep -v "^{" "$OUT/rollout_qwen.log" | quiet | tail -14; lap "rollout"
fi
if has dsrollout; then  # issue 10: the same on DeepSeek-V2-Lite, where EP wins at large batch
  timeout ${DR_TIMEOUT:-240} python3 -m moebius.bench.harness --preset deepseek-v2-lite --ranks 2 \
    --workload rollout --num-prompts ${DR_PROMPTS:-1024} --prompt-mean 256 --output-mean 256 \
    --output-cap 1024 --auto-start ep --profile results/profile_h200x2_deepseek_v2_lite.json \
    --out "$OUT/rollout_deepseek.json" > "$OUT/rollout_deepseek.log" 2>&1; echo "rc $?"
  grep -v "^{" "$OUT/rollout_deepseek.log" | quiet | grep -v "profile " | tail -14; lap "ds rollout"
fi
has deepseek && mr multirank_deepseek --preset deepseek-v2-lite \
  --batches 1 16 64 256 1024 2048 4096 --switch-fills 0.5
true
