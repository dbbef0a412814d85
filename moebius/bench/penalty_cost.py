"""What penalties cost a decode step as outputs grow: the tiny local checkpoint on this
machine's CPU, N requests sampling M tokens each, with presence and frequency penalties or
without, ms a step over each stretch of steps (``python -m moebius.bench.penalty_cost
--penalty 0.5``). The model is small, so the engine's and the sampler's own work shows."""

from __future__ import annotations

import argparse
import time

from moebius import LLM, SamplingParams
from moebius.model.tiny import default_checkpoint_dir, write_tiny_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--penalty", type=float, default=0.5, help="presence and frequency")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=1500)
    ap.add_argument("--stretch", type=int, default=500, help="steps a printed figure")
    args = ap.parse_args()
    path = write_tiny_checkpoint(default_checkpoint_dir())
    sp = SamplingParams(temperature=1.0, seed=1, max_tokens=args.tokens, ignore_eos=True,
                        frequency_penalty=args.penalty, presence_penalty=args.penalty)
    with LLM(path, num_kv_blocks=8192, max_model_len=2048,
             max_num_seqs=args.requests) as llm:
        engine = llm.engine
        for i in range(args.requests):
            engine.add_request([1 + (i * 7 + j) % 200 for j in range(16)], sp)
        t0 = mark = time.perf_counter()
        steps = 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
            if steps % args.stretch == 0:
                now = time.perf_counter()
                print(f"steps {steps - args.stretch}-{steps}: "
                      f"{(now - mark) / args.stretch * 1e3:.2f} ms/step", flush=True)
                mark = now
        print(f"total {time.perf_counter() - t0:.1f} s, {steps} steps")


if __name__ == "__main__":
    main()
