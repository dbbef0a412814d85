"""The sampler alone: ms per call of ``sampler.sample`` on (B, V) float32 logits, greedy,
temperature only and temperature + top-p (+ top-k, min-p), with the eager draw, the fused
Triton draw (``MOEBIUS_FUSED_SAMPLING``) and, where a filter is on, the sort-free filter
(``MOEBIUS_FUSED_FILTER``), checking that all give the same tokens.

    python -m moebius.bench.sampling --batches 1 16 64 256 --vocab 151936 --out r.json
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch

from moebius.model import sampler
from moebius.model.sampler import SamplingTensors


def _tensors(B: int, temperature: float, top_p: float, top_k: int, min_p: float,
             dev) -> SamplingTensors:
    g = torch.Generator().manual_seed(B)
    return SamplingTensors(
        temperature=torch.full((B,), temperature, device=dev),
        top_k=torch.full((B,), top_k, dtype=torch.long, device=dev),
        top_p=torch.full((B,), top_p, device=dev),
        min_p=torch.full((B,), min_p, device=dev),
        seeds=torch.randint(0, 2**40, (B,), generator=g).to(dev),
        steps=torch.randint(0, 4096, (B,), generator=g).to(dev),
        need_filter=top_p < 1 or top_k > 0 or min_p > 0,
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
    fused_draw, fused_filter = sampler.FUSED_DRAW, sampler.FUSED_FILTER
    rows = []
    print(f"{'batch':>6} {'mode':>16} {'eager ms':>9} {'fused ms':>9} {'filter ms':>9} "
          f"{'same':>5}")
    for B in args.batches:
        logits = torch.randn(B, args.vocab, device=dev) * 4
        for mode, temp, top_p, top_k, min_p in (
                ("greedy", 0.0, 1.0, 0, 0.0), ("temperature", 1.0, 1.0, 0, 0.0),
                ("temp + top-p", 0.8, 0.9, 0, 0.0), ("top-k 50 + min-p", 0.8, 1.0, 50, 0.01)):
            st = _tensors(B, temp, top_p, top_k, min_p, dev)
            sample = functools.partial(sampler.sample, logits, st)
            sampler.FUSED_DRAW = sampler.FUSED_FILTER = False
            eager = _ms(sample, args.reps, dev)
            ref = sample()
            fused = filt = None
            same = True
            if fused_ok:
                sampler.FUSED_DRAW = True
                fused = _ms(sample, args.reps, dev)
                same &= bool(torch.equal(sample(), ref))
                if st.need_filter:
                    sampler.FUSED_FILTER = True
                    filt = _ms(sample, args.reps, dev)
                    same &= bool(torch.equal(sample(), ref))
            rows.append({"batch": B, "mode": mode, "eager_ms": eager, "fused_ms": fused,
                         "fused_filter_ms": filt, "same_tokens": same if fused_ok else None})
            f, ff = ("-" if t is None else f"{t:.3f}" for t in (fused, filt))
            print(f"{B:>6} {mode:>16} {eager:>9.3f} {f:>9} {ff:>9} "
                  f"{str(same) if fused_ok else '-':>5}")
    sampler.FUSED_DRAW, sampler.FUSED_FILTER = fused_draw, fused_filter
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"vocab": args.vocab, "rows": rows, "device": str(dev)}, fh, indent=1)


if __name__ == "__main__":
    main()
