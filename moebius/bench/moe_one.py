"""One decode token's routed experts, alone, inside CUDA graphs: the three launches of
triton_moe (top-k + alignment, gate/up, down) against triton_moe_one's single persistent launch
(several tile shapes) and its two-launch split, against the HBM floor of the K experts' bytes;
plus the grid barrier's own cost (µs a barrier, all programs resident).

Each graph runs one call per layer over ``--layers`` distinct sets of expert weights with
fresh random logits, so the weights come from HBM, not L2, as in a real step.

    python -m moebius.bench.moe_one --preset qwen3-30b-a3b --layers 8
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

from moebius.bench.decode import copy_bandwidth
from moebius.bench.gpu_timing import median_replay_seconds
from moebius.config import preset
from moebius.model import triton_moe_one as one
from moebius.model.moe import experts_reference
from moebius.model.triton_barrier import grid_barrier
from moebius.model.triton_moe import Routed, experts_routed, route_align, route_topk

# (BR, BH, CK, warps, programs an SM, top-k)
CONFIGS = [(2, 64, 128, 8, 2, "rank"), (2, 64, 128, 8, 2, "argmax"), (2, 32, 256, 8, 2, "rank"),
           (4, 64, 256, 8, 1, "rank"), (2, 64, 128, 8, 1, "rank")]


@triton.jit
def _barriers_kernel(Bar, Out, N, NPROG: tl.constexpr):
    for _ in range(N):
        grid_barrier(Bar, NPROG)
    tl.store(Out + tl.program_id(0), N)


def barrier_us(programs: int, warps: int = 8) -> float:
    """µs a grid barrier at ``programs`` resident programs (100 barriers minus 1, in a graph)."""
    bar = torch.zeros(2, dtype=torch.int32, device="cuda")
    out = torch.empty(programs, dtype=torch.int32, device="cuda")

    def launch(n):
        _barriers_kernel[(programs,)](bar, out, n, NPROG=programs, num_warps=warps)

    times = {}
    for n in (1, 101):
        launch(n)
        times[n] = graph_ms(lambda n=n: launch(n), calls=10)
    assert int(out.min()) == 101 and int(bar[0]) == 0
    return (times[101] - times[1]) / 100 * 1e3


def graph_ms(fn, calls: int, reps: int = 30) -> float:
    """ms a call of ``fn`` (``calls`` calls a graph replay; the median of ``reps`` replays)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return median_replay_seconds(g, reps) * 1e3 / calls


def set_config(br, bh, ck, warps, per_sm, topk, mode="1"):
    one.BR, one.BH, one.CK, one.WARPS, one.PER_SM = br, bh, ck, warps, per_sm
    one.TOPK, one.MODE = topk, mode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    m = preset(args.preset)
    E, H, c, K, L = m.num_experts, m.hidden_size, m.moe_intermediate_size, m.top_k, args.layers
    bw = copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = [(torch.randn(E, 2 * c, H, device="cuda", generator=g) * H**-0.5).bfloat16()
           for _ in range(L)]
    w2 = [(torch.randn(E, c, H, device="cuda", generator=g) * c**-0.5).bfloat16()
          for _ in range(L)]
    x = [torch.randn(1, H, device="cuda", generator=g).bfloat16() for _ in range(L)]
    routed = [Routed(1, K, E, torch.bfloat16, "cuda", m.norm_topk_prob) for _ in range(L)]
    for r in routed:
        r.logits.copy_(torch.randn(1, E, device="cuda", generator=g))
    floor_us = K * 3 * c * H * 2 / bw * 1e6
    result = {"device": torch.cuda.get_device_name(), "copy_bw": bw, "floor_us": floor_us,
              "layers": L, "barrier_us": {}, "rows": []}
    print(f"{result['device']}: copy {bw / 1e12:.2f} TB/s; E={E} K={K} H={H} c={c}; "
          f"floor {floor_us:.1f} us a layer")
    for per_sm in (1, 2):
        us = barrier_us(sms * per_sm)
        result["barrier_us"][per_sm] = us
        print(f"grid barrier, {sms * per_sm} programs: {us:.2f} us")

    def check(rows, i):
        ids, wts = route_topk(routed[i].logits, K, m.norm_topk_prob, torch.bfloat16)
        ref = experts_reference(x[i].double(), ids, wts.double(), w13[i].double(),
                                w2[i].double())
        return float((rows.sum(1).double() - ref).norm() / ref.norm())

    def three():
        for i in range(L):
            route_align(routed[i])
            experts_routed(x[i], routed[i], w13[i], w2[i])

    variants = [("3 launches", None, three)]
    for cfg in CONFIGS:
        for mode in ("1", "split"):
            if mode == "split" and cfg != CONFIGS[0]:
                continue

            def fused(cfg=cfg, mode=mode):
                set_config(*cfg, mode)
                for i in range(L):
                    r = routed[i]
                    one.experts_one(x[i], r.logits, r.ids, r.weights, w13[i], w2[i],
                                    r.renormalize)
            variants.append((f"{'one' if mode == '1' else 'split'} {cfg}", cfg, fused))
    for name, cfg, fn in variants:
        try:
            if cfg is None:
                route_align(routed[0])
                err = check(experts_routed(x[0], routed[0], w13[0], w2[0]), 0)
            else:
                set_config(*cfg, "1" if name.startswith("one") else "split")
                r = routed[0]
                out = one.experts_one(x[0], r.logits, r.ids, r.weights, w13[0], w2[0],
                                      r.renormalize)
                err = check(out, 0)
            us = graph_ms(fn, calls=L) * 1e3
        except Exception as e:  # a config that does not fit is a row, not the end
            print(f"{name:32s} failed: {str(e).splitlines()[0][:100]}")
            continue
        row = {"variant": name, "us": us, "x_floor": us / floor_us, "rel_err": err}
        result["rows"].append(row)
        print(f"{name:32s} {us:7.2f} us  {us / floor_us:.2f}x floor  rel err {err:.1e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
