"""The decode projections at 1-8 tokens: cuBLAS (``F.linear``) against the Triton GEMV
(model/triton_gemv.py) in several tile shapes, inside CUDA graphs, against the HBM floor
(the weight's bytes over the measured copy bandwidth). Weight copies rotate so that the
L2 cache (50 MB on H200) never holds the next call's weights.

    python -m moebius.bench.gemv --preset qwen3-30b-a3b --tokens 1 2 4 8
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from moebius.bench.decode import copy_bandwidth
from moebius.bench.moe_kernels import graph_ms
from moebius.config import preset
from moebius.model.triton_gemv import gemv

CONFIGS = [(16, 256, 4, 4), (16, 512, 3, 4), (32, 256, 4, 4), (16, 128, 8, 4), (64, 128, 4, 4),
           (32, 512, 3, 8)]


def shapes(m) -> dict[str, tuple[int, int]]:
    q, kv = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    return {"qkv": (q + 2 * kv, m.hidden_size), "o": (m.hidden_size, q),
            "router": (m.num_experts, m.hidden_size), "lm_head": (m.vocab_size, m.hidden_size)}


def rotating(fn, x, ws):
    """A call of ``fn(x, w)`` taking the next weight copy each time."""
    i = [0]

    def call():
        i[0] = (i[0] + 1) % len(ws)
        return fn(x, ws[i[0]])

    return call


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    m = preset(args.preset)
    bw = copy_bandwidth()
    g = torch.Generator(device="cuda").manual_seed(0)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    rows = []
    for name, (N, K) in shapes(m).items():
        nbytes = N * K * 2
        copies = max(1, min(16, -(-(200 << 20) // nbytes)))
        ws = [(torch.randn(N, K, device="cuda", generator=g) * K**-0.5).bfloat16()
              for _ in range(copies)]
        floor_ms = nbytes / bw * 1e3
        for T in args.tokens:
            x = torch.randn(T, K, device="cuda", generator=g).bfloat16()
            ref = x.double() @ ws[0].double().T
            row = {"proj": name, "N": N, "K": K, "tokens": T, "floor_ms": floor_ms,
                   "cublas_ms": graph_ms(rotating(F.linear, x, ws))}
            best = None
            for cfg in CONFIGS:
                bn, bk, stages, warps = cfg
                out = gemv(x, ws[0], bn, bk, stages, warps)
                torch.cuda.synchronize()
                err = rel(out, ref)
                assert err < 1e-2, (name, T, cfg, err)
                ms = graph_ms(rotating(lambda a, w, c=cfg: gemv(a, w, *c), x, ws))
                row[f"triton_{bn}_{bk}_{stages}_{warps}_ms"] = ms
                if best is None or ms < best[0]:
                    best = (ms, cfg)
            row["best_triton_ms"], row["best_cfg"] = best
            rows.append(row)
            print(f"{name:8s} T={T}: floor {floor_ms * 1e3:7.1f} us, cuBLAS "
                  f"{row['cublas_ms'] * 1e3:7.1f} us ({row['cublas_ms'] / floor_ms:.2f}x), "
                  f"Triton {best[0] * 1e3:7.1f} us ({best[0] / floor_ms:.2f}x) {best[1]}")
        del ws
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"copy_bw": bw, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
