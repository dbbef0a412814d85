# Sourced by the scripts/gpu_*.sh runs on a lent GPU machine: strict mode, the package on the
# path, $OUT for results, `quiet` (drops warnings), `lap` (seconds since start), the GPUs.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
quiet() { grep -v "Warn\|warn\|softmax\|Inductor\|Cut an\|^ *$\|TCPStore\|frame #\|Exception raised\|should dump"; }
T0=$SECONDS; lap() { echo "[$1: $((SECONDS - T0)) s]"; }
date -u; nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
