"""Where a decode step's GPU time goes: one eager decode step under torch.profiler, kernels
grouped by name, for a batch size (CUDA).

    python -m moebius.bench.profile_step --preset qwen3-30b-a3b --layers 8 --batch 64
"""

from __future__ import annotations

import argparse

import torch

from moebius.bench.decode import random_batch_engine
from moebius.config import preset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    args = ap.parse_args()
    model = preset(args.preset, num_hidden_layers=args.layers)
    for B in args.batch:
        engine = random_batch_engine(model, B, prompt_len=128, max_tokens=100, enforce_eager=True)
        for _ in range(4):
            engine.step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                engine.step()
            torch.cuda.synchronize()
        print(f"\n=== batch {B}, {args.layers} layers, 3 eager decode steps")
        print(
            prof.key_averages().table(
                sort_by="cuda_time_total", row_limit=18, max_name_column_width=60
            )
        )
        engine.shutdown()


if __name__ == "__main__":
    main()
