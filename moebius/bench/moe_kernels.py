"""Expert kernels alone, inside CUDA graphs: fused Triton MoE (several tile shapes) against
grouped GEMM with sort/scatter, at decode batch sizes, against the HBM floor of the distinct
experts read. Prints a table; picks the tiles ``triton_moe._tiles`` should use. At every size
also the fused kernels with prefill tiles (``triton_moe_large``, a few (BM, tiles, warps)),
with their TFLOP/s: whether ``MOEBIUS_MOE_LARGE=fused`` should become the default.

    python -m moebius.bench.moe_kernels --preset qwen3-30b-a3b --tokens 1 8 16 64 256 512
    python -m moebius.bench.moe_kernels --tokens 512 2048 8192
    python -m moebius.bench.moe_kernels --one-sweep   # batch 1's path: tiles, warps, stages
    python -m moebius.bench.moe_kernels --down-sweep 2048  # the prefill down kernel's tiles

``--down-sweep`` times the prefill-size fused experts (``triton_moe_large``) at 2,048 tokens
with the gate/up kernel at its tiles and the down kernel over tiles, warps and stages (it ran
at half the gate/up kernel's rate in session 12), in TFLOP/s.

``--one-sweep`` times the engine's one-token path (``experts_routed``: the gate/up kernel
routes the token itself) over gate/up and down tiles, warps and pipeline stages, each call of
a graph on another token's experts (no L2 reuse), against the bytes of its 8 experts.
"""

from __future__ import annotations

import argparse
import functools
import json

import torch

from moebius.bench.decode import copy_bandwidth
from moebius.config import preset
from moebius.model.moe import experts_grouped, experts_reference
from moebius.model.triton_moe import MAX_PAIRS, experts_fused
from moebius.model.triton_moe_large import experts_fused_large

TILES = [(32, 256, 64, 128), (64, 128, 64, 128), (32, 128, 32, 256), (64, 256, 128, 64),
         (16, 512, 32, 256)]
LARGE = [(64, (128, 64, 128, 64), 8), (128, (128, 64, 128, 64), 8), (64, (64, 128, 64, 128), 4)]


def graph_ms(fn, reps: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(10):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 10


def _checked(label: str, check, run, reps: int = 50):
    """(check(): the largest relative error, graph ms of ``run``), or None where the shape
    does not compile (out of shared memory or registers): the sweeps' one trial."""
    try:
        return check(), graph_ms(run, reps)
    except Exception as e:
        print(f"{label}: {type(e).__name__}")
        return None


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


ONE_W13 = [(64, 128), (32, 128), (32, 256), (16, 512)]
ONE_W2 = [(64, 128), (32, 256), (128, 64), (64, 256)]
ONE_LAUNCH = [(4, 4), (4, 6), (2, 4), (8, 4), (8, 6)]  # (warps, stages)


def one_sweep(m, w13, w2, bw: float, out: str | None) -> None:
    """The one-token experts over ONE_W13 x ONE_LAUNCH (down at its default), then ONE_W2 x
    ONE_LAUNCH (gate/up at its default); prints each and the best, µs a layer."""
    from moebius.model.triton_moe import Routed, _tiles, experts_routed

    P, H, c, K = m.num_experts, m.hidden_size, m.moe_intermediate_size, m.top_k
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1, H, device="cuda", generator=g).bfloat16()
    routeds = []
    for _ in range(10):
        r = Routed(1, K, P, torch.bfloat16, "cuda", renormalize=m.norm_topk_prob)
        r.logits.copy_(torch.randn(1, P, device="cuda", generator=g))
        routeds.append(r)
    floor_us = K * 3 * c * H * 2 / bw * 1e6
    base = _tiles(K)
    ref = [experts_routed(x, r, w13, w2).float().clone() for r in routeds]
    rows = []

    def timed(tiles, launch, label):
        calls = iter(range(10**9))
        trial = _checked(
            label,
            lambda: max(_rel(experts_routed(x, r, w13, w2, tiles=tiles, launch=launch), want)
                        for r, want in zip(routeds, ref, strict=True)),
            lambda: experts_routed(x, routeds[next(calls) % 10], w13, w2, tiles=tiles,
                                   launch=launch),
        )
        if trial is None:
            return
        err, us = trial[0], trial[1] * 1e3
        rows.append({"part": label.split()[0], "tiles": tiles, "launch": launch, "us": us,
                     "err": err})
        print(f"{label}: {us:6.1f} us ({floor_us / us:.0%} of bandwidth) err {err:.1e}")

    print(f"one token, {K} experts: floor {floor_us:.1f} us a layer; default tiles {base}")
    for bn, bk in ONE_W13:
        for w, st in ONE_LAUNCH:
            timed((bn, bk) + base[2:], (w, st, 4, 4), f"w13 {bn}x{bk} {w}w {st}s")
    for bn, bk in ONE_W2:
        for w, st in ONE_LAUNCH:
            timed(base[:2] + (bn, bk), (4, 4, w, st), f"w2 {bn}x{bk} {w}w {st}s")
    for part in ("w13", "w2"):
        best = sorted((r for r in rows if r["part"] == part), key=lambda r: r["us"])[:3]
        print(f"best {part}: " + "; ".join(f"{r['tiles']} {r['launch']} {r['us']:.1f} us"
                                           for r in best))
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)


DOWN_TILES = [(128, 64), (128, 128), (64, 128), (256, 64), (128, 32)]
DOWN_LAUNCH = [(8, 4), (8, 3), (4, 4), (8, 5)]  # (warps, stages)


def down_sweep(m, w13, w2, tokens: int, out: str | None) -> None:
    """The prefill fused experts at ``tokens`` tokens over DOWN_TILES x DOWN_LAUNCH for the
    down kernel (gate/up as TILES_LARGE); grouped GEMM for reference; TFLOP/s of the pair."""
    from moebius.model.triton_moe_large import TILES_LARGE, WARPS_LARGE

    P, H, K = m.num_experts, m.hidden_size, m.top_k
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(tokens, H, device="cuda", generator=g).bfloat16()
    wts, pieces = torch.rand(tokens, P, device="cuda", generator=g).topk(K, dim=-1)
    wts = (wts / wts.sum(-1, keepdim=True)).bfloat16()
    flops = tokens * K * 3 * m.moe_intermediate_size * H * 2
    want = experts_grouped(x, pieces, wts, w13, w2).float()
    grouped = graph_ms(functools.partial(experts_grouped, x, pieces, wts, w13, w2))
    print(f"{tokens} tokens: grouped GEMM {grouped:.3f} ms ({flops / grouped / 1e9:.0f} TFLOP/s)")
    rows = [{"down": "grouped", "ms": grouped}]
    for bn, bk in DOWN_TILES:
        for w, st in DOWN_LAUNCH:
            run = functools.partial(experts_fused_large, x, pieces, wts, w13, w2,
                                    tiles=TILES_LARGE[:2] + (bn, bk),
                                    launch=(WARPS_LARGE, 4, w, st))
            trial = _checked(f"down {bn}x{bk} {w}w {st}s", lambda r=run: _rel(r(), want), run,
                             reps=10)
            if trial is None:
                continue
            err, ms = trial
            rows.append({"down": (bn, bk, w, st), "ms": ms, "err": err})
            print(f"down {bn}x{bk} {w}w {st}s: {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s) "
                  f"err {err:.1e}")
    best = min(rows[1:], key=lambda r: r["ms"])
    print(f"best down {best['down']}: {best['ms']:.3f} ms against grouped {grouped:.3f}")
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128, 256, 512])
    ap.add_argument("--out", default=None)
    ap.add_argument("--one-sweep", action="store_true",
                    help="only the one-token path's tiles, warps and stages")
    ap.add_argument("--down-sweep", type=int, default=0, metavar="TOKENS",
                    help="only the prefill down kernel's tiles at TOKENS tokens")
    args = ap.parse_args()
    m = preset(args.preset)
    P, H, c, K = m.num_experts, m.hidden_size, m.moe_intermediate_size, m.top_k
    bw = copy_bandwidth()
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(P, 2 * c, H, device="cuda", generator=g) * H**-0.5).bfloat16()
    w2 = (torch.randn(P, c, H, device="cuda", generator=g) * c**-0.5).bfloat16()
    if args.one_sweep:
        return one_sweep(m, w13, w2, bw, args.out)
    if args.down_sweep:
        return down_sweep(m, w13, w2, args.down_sweep, args.out)
    rows = []
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; P={P} H={H} c={c} K={K}")
    for T in args.tokens:
        x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
        scores = torch.rand(T, P, device="cuda", generator=g)
        wts, pieces = scores.topk(K, dim=-1)
        wts = (wts / wts.sum(-1, keepdim=True)).bfloat16()
        distinct = int(pieces.unique().numel())
        floor = distinct * 3 * c * H * 2 / bw * 1e3
        ref = experts_reference(x.double(), pieces, wts.double(), w13.double(), w2.double())
        row = {"tokens": T, "distinct": distinct, "floor_ms": floor,
               "grouped_ms": graph_ms(functools.partial(experts_grouped, x, pieces, wts, w13, w2))}
        small = TILES if T * K <= MAX_PAIRS else []
        for tiles in small:
            out = experts_fused(x, pieces, wts, w13, w2, tiles=tiles)
            err = float((out.double() - ref).norm() / ref.norm())
            t = graph_ms(functools.partial(experts_fused, x, pieces, wts, w13, w2, tiles=tiles))
            row[f"fused{tiles}"] = t
            row[f"err{tiles}"] = err
        flops = T * K * 3 * c * H * 2
        for bm, tiles, warps in LARGE:
            run = functools.partial(experts_fused_large, x, pieces, wts, w13, w2, bm=bm,
                                    tiles=tiles, warps=warps)
            err = float((run().double() - ref).norm() / ref.norm())
            row[f"large{bm},{tiles},{warps}"] = t = graph_ms(run)
            row[f"large_err{bm},{tiles},{warps}"] = err
            print(f"T={T:5d} prefill tiles BM={bm} {tiles} {warps} warps: {t:.3f} ms "
                  f"({flops / t / 1e9:.0f} TFLOP/s; grouped {row['grouped_ms']:.3f} ms, "
                  f"{flops / row['grouped_ms'] / 1e9:.0f}) err {err:.1e}")
        rows.append(row)
        if not small:
            continue
        best = min(small, key=lambda tl: row[f"fused{tl}"])
        row["best_tiles"], row["best_ms"] = best, row[f"fused{best}"]
        fused = " ".join(f"{row[f'fused{tl}']:.3f}" for tl in small)
        print(f"T={T:4d} distinct={distinct:3d} floor {floor:.3f} ms | grouped "
              f"{row['grouped_ms']:.3f} | fused {fused} | best {best} {row['best_ms']:.3f} "
              f"({row['best_ms'] / floor:.2f}x floor) max err "
              f"{max(row[f'err{tl}'] for tl in small):.1e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
    main()
