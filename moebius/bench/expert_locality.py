"""The mechanism behind locality-aware decode routing: decode step time at a fixed batch as a
function of how many distinct experts the batch activates per layer.

    python -m moebius.bench.expert_locality --preset qwen3-30b-a3b --batch 64 \\
        --distinct 8 16 32 64 128

The router is wrapped so every token picks its top-k among an allowed set of experts (a fresh
random set per layer); the set is a device tensor edited in place, so the CUDA graphs captured
at start-up replay the new routing without recapture.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

import moebius.model.moe as moe
from moebius.bench.decode import (
    _graph_replay_seconds,
    copy_bandwidth,
    random_batch_engine,
    step_floor_bytes,
)
from moebius.config import preset


def install_expert_mask(num_layers: int, num_experts: int, device: str) -> torch.Tensor:
    """Bias added to the router logits of each MoE layer in call order: 0 or -inf per expert."""
    mask = torch.zeros(num_layers, num_experts, device=device)
    calls = {"i": 0}

    def masked_route(x, router, top_k, renormalize):
        layer = calls["i"] % num_layers  # MoE layers are routed in order every forward
        calls["i"] += 1
        logits = torch.nn.functional.linear(x, router) + mask[layer]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, top_k, dim=-1)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights.to(x.dtype)

    moe.route = masked_route
    return mask


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--distinct", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model = preset(args.preset)
    L, E, B = len(model.moe_layers), model.num_experts, args.batch
    mask = install_expert_mask(L, E, "cuda")
    rng = random.Random(0)  # prompts, then the allowed expert sets
    engine = random_batch_engine(model, B, prompt_len=64, max_tokens=10_000, rng=rng)
    for _ in range(3):
        engine.step()
    bw = copy_bandwidth()
    rows = []
    for k in args.distinct:
        mask.fill_(float("-inf"))
        for layer in range(L):
            mask[layer, rng.sample(range(E), k)] = 0.0
        for _ in range(2):
            engine.step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        step = (time.perf_counter() - t) / args.steps
        gpu = _graph_replay_seconds(engine, B)
        fl = step_floor_bytes(model, 1, 100)
        expert = 3 * model.moe_intermediate_size * model.hidden_size * 2
        floor = (fl["weights"] - 8 * expert * L + k * expert * L) / bw
        rows.append(
            {
                "batch": B,
                "distinct_experts": k,
                "step_ms": step * 1e3,
                "gpu_ms": gpu * 1e3 if gpu else None,
                "floor_ms": floor * 1e3,
            }
        )
        print(json.dumps(rows[-1]))
    engine.shutdown()
    base = rows[0]["step_ms"]
    print(f"\n{'distinct':>9} {'ms/step':>9} {'gpu ms':>8} {'floor ms':>9} {'vs first':>9}")
    for r in rows:
        print(
            f"{r['distinct_experts']:>9} {r['step_ms']:>9.2f} {r['gpu_ms'] or 0:>8.2f} "
            f"{r['floor_ms']:>9.2f} {r['step_ms'] / base:>8.2f}x"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
