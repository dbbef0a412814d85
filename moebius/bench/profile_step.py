"""Where a step's time goes (CUDA): eager decode steps (and optionally one prefill step)
under torch.profiler, kernels grouped by name; and, with ``--host``, graph-replayed decode
steps under cProfile, the engine's Python functions by cumulative time.

    python -m moebius.bench.profile_step --preset qwen3-30b-a3b --layers 8 --batch 1 64 \
        --prefill 1x2048 --host 256
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import torch

from moebius.bench.decode import random_batch_engine
from moebius.config import preset


def _table(prof, title: str) -> None:
    print(f"\n=== {title}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22,
                                    max_name_column_width=70))


def profile_decode(model, batch: int) -> None:
    engine = random_batch_engine(model, batch, prompt_len=128, max_tokens=100, enforce_eager=True)
    for _ in range(4):
        engine.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            engine.step()
        torch.cuda.synchronize()
    _table(prof, f"batch {batch}, {model.num_layers} layers, 3 eager decode steps")
    engine.shutdown()


def profile_prefill(model, prompts: int, tokens: int) -> None:
    # A warm-up engine compiles the fused ops for prefill shapes; the profiled one reuses them.
    for profiled in (False, True):
        engine = random_batch_engine(
            model, prompts, prompt_len=tokens, max_tokens=2, enforce_eager=True,
            max_num_batched_tokens=prompts * tokens, max_model_len=tokens + 16,
            num_kv_blocks=prompts * (tokens // 16 + 2) + 64)
        torch.cuda.synchronize()
        if not profiled:
            engine.step()
            engine.shutdown()
            continue
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            engine.step()
            torch.cuda.synchronize()
        _table(prof, f"prefill {prompts}x{tokens}, {model.num_layers} layers, one step")
        engine.shutdown()


def profile_host(model, batch: int) -> None:
    engine = random_batch_engine(model, batch, prompt_len=128, max_tokens=200)
    for _ in range(batch * 128 // engine.cfg.max_num_batched_tokens + 5):  # past all prefill
        engine.step()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(20):
        engine.step()
    prof.disable()
    print(f"\n=== host, batch {batch}, 20 graph-replayed decode steps (cumulative s)")
    pstats.Stats(prof).sort_stats("cumulative").print_stats("moebius", 30)
    engine.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 64])
    ap.add_argument("--prefill", nargs="*", default=[], help="PROMPTSxTOKENS, e.g. 1x2048")
    ap.add_argument("--host", type=int, nargs="*", default=[], help="batch sizes (cProfile)")
    args = ap.parse_args()
    model = preset(args.preset, num_hidden_layers=args.layers)
    for B in args.batch:
        profile_decode(model, B)
    for spec in args.prefill:
        p, t = (int(v) for v in spec.split("x"))
        profile_prefill(model, p, t)
    for B in args.host:
        profile_host(model, B)


if __name__ == "__main__":
    main()
