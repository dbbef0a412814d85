"""Where a decode step's GPU time goes: one eager decode step under torch.profiler, kernels
grouped by name, for a batch size (CUDA).

    python -m moebius.bench.profile_step --preset qwen3-30b-a3b --layers 8 --batch 64
"""

from __future__ import annotations

import argparse
import random

import torch

from moebius.config import EngineConfig, preset
from moebius.core import SamplingParams
from moebius.engine.llm_engine import LLMEngine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    args = ap.parse_args()
    model = preset(args.preset, num_hidden_layers=args.layers)
    for B in args.batch:
        cfg = EngineConfig(
            model=model,
            model_dir=None,
            device="cuda",
            dtype="bfloat16",
            num_kv_blocks=B * 16 + 64,
            max_num_seqs=B,
            max_model_len=2048,
            enable_prefix_caching=False,
            enforce_eager=True,
        )
        engine = LLMEngine(cfg)
        rng = random.Random(0)
        sp = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
        for _ in range(B):
            engine.add_request([rng.randrange(model.vocab_size) for _ in range(128)], sp)
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
