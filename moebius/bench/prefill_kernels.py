"""Prefill kernels alone (one GPU, bf16, Qwen3-30B-A3B attention shapes): the paged prefill
attention at every (BM, BN, warps, stages) of a sweep, checked against SDPA and timed (median
of ``triton.testing.do_bench``) in TFLOP/s of causal attention; the gated activation of the
grouped-GEMM rows, torch.compile's kernel against ``triton_gated``, in GB/s. Prints tables;
``triton_prefill.LAUNCH`` should name the fastest tiles.

    python -m moebius.bench.prefill_kernels --shapes 1x2048 16x512 2x4096 --out r.json
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from moebius.bench.decode import copy_bandwidth
from moebius.model.attention import PrefillChunk
from moebius.model.moe import _gated
from moebius.model.triton_gated import silu_mul
from moebius.model.triton_prefill import LAUNCH, PrefillPlan, paged_prefill_attention

SWEEP = list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)))


def _case(n: int, length: int, nh: int, kvh: int, d: int, bs: int, g):
    """Random q and a paged pool holding n prompts of ``length`` tokens in shuffled pages,
    with the SDPA reference output."""
    pages = n * (length // bs)
    k = torch.randn(pages, bs, kvh, d, device="cuda", generator=g).bfloat16()
    v = torch.randn(pages, bs, kvh, d, device="cuda", generator=g).bfloat16()
    perm = torch.randperm(pages, device="cuda", generator=g)
    chunks = [PrefillChunk(i * length, length, 0, perm[i * (length // bs):(i + 1) * (length // bs)])
              for i in range(n)]
    q = torch.randn(n * length, nh, d, device="cuda", generator=g).bfloat16()
    ref = torch.empty_like(q)
    for c in chunks:
        kk = k[c.block_table].view(-1, kvh, d).transpose(0, 1)
        vv = v[c.block_table].view(-1, kvh, d).transpose(0, 1)
        qc = q[c.token_start:c.token_start + length].transpose(0, 1)
        o = F.scaled_dot_product_attention(qc, kk, vv, is_causal=True, enable_gqa=True)
        ref[c.token_start:c.token_start + length] = o.transpose(0, 1)
    return q, k, v, chunks, ref


def attention(shapes, nh=32, kvh=4, d=128, bs=16) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for n, length in shapes:
        q, k, v, chunks, ref = _case(n, length, nh, kvh, d, bs, g)
        flops = n * 4 * nh * d * length * (length + 1) / 2
        group = nh // kvh  # K/V gathered and repeated per query head: SDPA's flash kernel
        gathered = [(k[c.block_table].view(-1, kvh, d).transpose(0, 1).repeat_interleave(group, 0),
                     v[c.block_table].view(-1, kvh, d).transpose(0, 1).repeat_interleave(group, 0),
                     q[c.token_start:c.token_start + length].transpose(0, 1)) for c in chunks]

        def dense(gathered=gathered):  # flash attention on a contiguous cache: a yardstick
            for kk, vv, qc in gathered:
                F.scaled_dot_product_attention(qc, kk, vv, is_causal=True)

        row = {"shape": f"{n}x{length}", "sdpa_dense_tflops": flops / do_bench(dense) / 1e9,
               "default": list(LAUNCH), "configs": {}}
        for launch in SWEEP:
            plan = PrefillPlan.build(chunks, "cuda", launch)
            out = torch.full_like(q, float("nan"))
            try:
                paged_prefill_attention(q, k, v, plan, d**-0.5, out)
                torch.cuda.synchronize()
            except Exception as e:  # out of shared memory or registers: not a candidate
                row["configs"][str(launch)] = {"error": type(e).__name__}
                continue
            err = float((out.double() - ref.double()).norm() / ref.double().norm())
            ms = do_bench(lambda a=(q, k, v, plan, d**-0.5, out): paged_prefill_attention(*a),
                          warmup=10, rep=50, return_mode="median")
            row["configs"][str(launch)] = {"ms": ms, "tflops": flops / ms / 1e9, "rel_err": err}
        rows.append(row)
    return rows


def gated(rows_list, c=768) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(1)
    out = []
    for M in rows_list:
        h = torch.randn(M, 2 * c, device="cuda", generator=g).bfloat16()
        same = torch.equal(_gated(h), silu_mul(h))
        err = float((_gated(h).double() - silu_mul(h).double()).abs().max())
        nbytes = M * 3 * c * 2
        t_compiled = do_bench(lambda h=h: _gated(h), return_mode="median")
        t_triton = do_bench(lambda h=h: silu_mul(h), return_mode="median")
        out.append({"rows": M, "compiled_GBps": nbytes / t_compiled / 1e6,
                    "triton_GBps": nbytes / t_triton / 1e6, "equal": same, "max_abs_diff": err,
                    "compiled_us": t_compiled * 1e3, "triton_us": t_triton * 1e3})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["1x2048", "16x512", "2x4096"])
    ap.add_argument("--gated-rows", type=int, nargs="*", default=[16384, 65536])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes]
    bw = copy_bandwidth()
    att = attention(shapes)
    for r in att:
        ok = {k: v for k, v in r["configs"].items() if "tflops" in v}
        best = sorted(ok.items(), key=lambda kv: -kv[1]["tflops"])
        default = ok.get(str(tuple(r["default"])), {})
        print(f"attention {r['shape']}: default {tuple(r['default'])} "
              f"{default.get('tflops', 0):.0f} TFLOP/s; SDPA (contiguous) "
              f"{r['sdpa_dense_tflops']:.0f}; "
              f"worst rel err {max(v['rel_err'] for v in ok.values()):.1e}")
        for k, v in best[:6]:
            print(f"   {k:>20} {v['tflops']:7.0f} TFLOP/s {v['ms']:8.3f} ms")
    gat = gated(args.gated_rows)
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
    for r in gat:
        print(f"gated {r['rows']} rows: compiled {r['compiled_us']:.1f} us "
              f"({r['compiled_GBps']:.0f} GB/s), triton {r['triton_us']:.1f} us "
              f"({r['triton_GBps']:.0f} GB/s); equal {r['equal']} "
              f"(max diff {r['max_abs_diff']:.2g})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"attention": att, "gated": gat, "copy_bw_GBps": bw / 1e9,
                       "device": torch.cuda.get_device_name()}, f, indent=1)


if __name__ == "__main__":
    main()
