"""The sampler alone: ms per call of ``sampler.sample`` on (B, V) float32 logits, greedy,
temperature only and temperature + top-p, with the eager draw and with the fused Triton draw
(``MOEBIUS_FUSED_SAMPLING``'s path), checking that both give the same tokens.

    python -m moebius.bench.sampling --batches 1 16 64 256 --vocab 151936 --out r.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from moebius.model import sampler
from moebius.model.sampler import SamplingTensors


def _tensors(B: int, temperature: float, top_p: float, dev) -> SamplingTensors:
    g = torch.Generator().manual_seed(B)
    return SamplingTensors(
        temperature=torch.full((B,), temperature, device=dev),
        top_k=torch.zeros(B, dtype=torch.long, device=dev),
        top_p=torch.full((B,), top_p, device=dev),
        min_p=torch.zeros(B, device=dev),
        seeds=torch.randint(0, 2**40, (B,), generator=g).to(dev),
        steps=torch.randint(0, 4096, (B,), generator=g).to(dev),
        need_filter=top_p < 1,
        all_greedy=temperature == 0,
    )


def _ms(fn, reps: int, dev) -> float:
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    fused_ok = dev.type == "cuda" and sampler.gumbel_max is not None
    rows = []
    print(f"{'batch':>6} {'mode':>14} {'eager ms':>9} {'fused ms':>9} {'same':>5}")
    for B in args.batches:
        logits = torch.randn(B, args.vocab, device=dev) * 4
        for mode, temp, top_p in (("greedy", 0.0, 1.0), ("temperature", 1.0, 1.0),
                                  ("temp + top-p", 0.8, 0.9)):
            st = _tensors(B, temp, top_p, dev)
            sampler.FUSED_DRAW = False
            eager = _ms(lambda st=st, lg=logits: sampler.sample(lg, st), args.reps, dev)
            ref = sampler.sample(logits, st)
            fused = same = None
            if fused_ok:
                sampler.FUSED_DRAW = True
                fused = _ms(lambda st=st, lg=logits: sampler.sample(lg, st), args.reps, dev)
                same = bool(torch.equal(sampler.sample(logits, st), ref))
                sampler.FUSED_DRAW = False
            rows.append({"batch": B, "mode": mode, "eager_ms": eager, "fused_ms": fused,
                         "same_tokens": same})
            f = "-" if fused is None else f"{fused:.3f}"
            print(f"{B:>6} {mode:>14} {eager:>9.3f} {f:>9} {str(same):>5}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"vocab": args.vocab, "rows": rows, "device": str(dev)}, fh, indent=1)


if __name__ == "__main__":
    main()
