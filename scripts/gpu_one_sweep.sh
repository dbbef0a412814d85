#!/usr/bin/env bash
# On one lent GPU (~3 minutes): batch 1's experts. `bench.moe_kernels --one-sweep` times the
# one-token gate/up and down kernels over tiles, warps and stages in isolation; the best of
# each then runs the whole decode step (batch 1 and 8, Qwen3-30B-A3B shapes) against the
# defaults, twice in alternation (MOEBIUS_MOE_TILES_SMALL, MOEBIUS_MOE_LAUNCH_SMALL).
source "$(dirname "$0")/gpu_common.sh"
timeout 150 python3 -m moebius.bench.moe_kernels --one-sweep --out "$OUT/one_sweep.json" 2>&1 \
  | quiet | grep -v " us (" ; lap sweep
grep -h '"us"' "$OUT/one_sweep.json" >/dev/null || exit 0
read -r TILES LAUNCH < <(python3 - "$OUT/one_sweep.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
best = {p: min((r for r in rows if r["part"] == p), key=lambda r: r["us"]) for p in ("w13", "w2")}
t = best["w13"]["tiles"][:2] + best["w2"]["tiles"][2:]
la = best["w13"]["launch"][:2] + best["w2"]["launch"][2:]
print(",".join(map(str, t)), ",".join(map(str, la)))
PY
)
echo "best: MOEBIUS_MOE_TILES_SMALL=$TILES MOEBIUS_MOE_LAUNCH_SMALL=$LAUNCH"
run() {  # $1 tag; env passes through
  timeout 90 python3 -m moebius.bench.decode --batches 1 8 --out "$OUT/decode_$1.json" 2>&1 \
    | quiet | grep -v '^{' | grep "^ *[18] " | sed "s/^/[$1] /"; lap "$1"
}
for i in 1 2; do
  run "default$i"
  MOEBIUS_MOE_TILES_SMALL=$TILES MOEBIUS_MOE_LAUNCH_SMALL=$LAUNCH run "best$i"
done
