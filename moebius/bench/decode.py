"""Decode throughput of the real engine at fixed batch sizes, against the HBM floor.

    python -m moebius.bench.decode --preset qwen3-30b-a3b --batches 1 16 64 256 --out r.json

Random bf16 weights from a preset (no checkpoint needed). For each batch size: B requests with
random prompts are prefilled, then decode steps are timed end to end through ``engine.step()``
(scheduling, input preparation, forward, sampling, bookkeeping). The floor is the bytes a step
must read (dense weights, lm_head, the distinct experts that B·k random picks activate in
expectation, the KV of the batch) over the measured device copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from moebius import cli
from moebius.bench.gpu_timing import print_kernel_table
from moebius.config import EngineConfig, ModelConfig, preset
from moebius.core import SamplingParams
from moebius.engine.llm_engine import LLMEngine


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device="cuda", nbytes=4 << 30) -> float:
    """Memory traffic in bytes/s of a large device-to-device copy (read plus write)."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    _sync(device)
    return 10 * nbytes / (time.perf_counter() - t0)


def step_floor_bytes(m: ModelConfig, batch: int, context: int, elem: int = 2) -> dict:
    """Bytes one decode step must read at ``batch`` sequences of ``context`` tokens."""
    H = m.hidden_size
    attn = (2 * m.q_size * H + 2 * m.kv_size * H) * elem
    router = m.num_experts * H * elem
    expert = 3 * m.moe_intermediate_size * H * elem
    distinct = m.num_experts * (1 - (1 - m.top_k / m.num_experts) ** batch)
    per_layer = attn + router + distinct * expert
    kv = batch * context * m.num_layers * m.kv_planes * m.kv_size * elem
    head = m.vocab_size * H * elem
    return {
        "weights": per_layer * m.num_layers + head,
        "kv": kv,
        "distinct_experts_per_layer": distinct,
    }


def random_batch_engine(
    model: ModelConfig,
    batch: int,
    prompt_len: int,
    max_tokens: int,
    rng: random.Random | None = None,
    **overrides,
) -> LLMEngine:
    """A bf16 CUDA engine with random weights holding ``batch`` requests of random prompts
    drawn from ``rng`` (no prefix caching, 2048 tokens a request unless ``overrides`` say)."""
    settings = dict(
        device="cuda",
        dtype="bfloat16",
        num_kv_blocks=max(batch * 16 + 64, 2048 // 16 + 1),  # one request fits max_model_len
        max_num_seqs=batch,
        max_model_len=2048,
        enable_prefix_caching=False,
    )
    engine = LLMEngine(EngineConfig(model=model, model_dir=None, **{**settings, **overrides}))
    rng = rng or random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for _ in range(batch):
        engine.add_request([rng.randrange(model.vocab_size) for _ in range(prompt_len)], params)
    return engine


def run(
    model: ModelConfig,
    batches: list[int],
    prompt_len: int,
    decode_steps: int,
    warmup: int,
    seed: int = 0,
    device: str = "cuda",
    async_scheduling: bool | None = None,
    kernel_tables=(),
    max_model_len: int = 4096,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> list[dict]:
    max_batch = max(batches)
    ctx = prompt_len + warmup + decode_steps + 2
    blocks = max(max_batch * ((ctx + 15) // 16) + 64, max_model_len // 16 + 1)
    cfg = EngineConfig(
        model=model,
        model_dir=None,
        device=device,
        dtype="bfloat16" if device == "cuda" else "float32",
        num_kv_blocks=blocks,
        max_num_seqs=max_batch,
        max_num_batched_tokens=8192,
        max_model_len=max_model_len,
        enable_prefix_caching=False,
        seed=seed,
        async_scheduling=async_scheduling,
    )
    t0 = time.perf_counter()
    engine = LLMEngine(cfg)
    print(f"engine up in {time.perf_counter() - t0:.1f} s; memory {engine.memory[0]}")
    bw = copy_bandwidth(device, (4 << 30) if device == "cuda" else (64 << 20))
    rng = random.Random(seed)
    rows = []
    for B in batches:
        params = SamplingParams(
            temperature=temperature, top_p=top_p, max_tokens=warmup + decode_steps + 1,
            ignore_eos=True, seed=seed,
        )
        for _ in range(B):
            prompt = [rng.randrange(model.vocab_size) for _ in range(prompt_len)]
            engine.add_request(prompt, params)
        while (
            any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running)
            or engine.scheduler.waiting
        ):
            engine.step()
        for _ in range(warmup):
            engine.step()
        _sync(device)
        times = []
        for _ in range(decode_steps):
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
        while engine.has_unfinished():
            engine.step()
        times.sort()
        step = times[len(times) // 2]
        gpu = (
            engine.executor.call("moebius.bench.gpu_timing:graph_replay_seconds", B)[0]
            if device == "cuda"
            else None
        )
        if device == "cuda" and B in kernel_tables:
            table = engine.executor.call("moebius.bench.gpu_timing:graph_kernel_table", B)[0]
            print_kernel_table(table, f"b{B}: kernels of one graph replay")
        floor = step_floor_bytes(model, B, prompt_len + warmup + decode_steps // 2)
        # bw counts read + write traffic of a copy; a step's bytes are read once each
        floor_s = (floor["weights"] + floor["kv"]) / bw
        rows.append(
            {
                "batch": B,
                "step_ms": step * 1e3,
                "tokens_per_s": B / step,
                "floor_ms": floor_s * 1e3,
                "x_floor": step / floor_s,
                "distinct_experts": floor["distinct_experts_per_layer"],
                "copy_bw_GBps": bw / 1e9,
                "gpu_ms": None if gpu is None else gpu * 1e3,
                "host_ms": None if gpu is None else (step - gpu) * 1e3,
            }
        )
        print(json.dumps(rows[-1]))
    engine.shutdown()
    return rows


def run_prefill(model: ModelConfig, shapes: list[tuple[int, int]], seed: int = 0,
                kernel_tables=()) -> list[dict]:
    """Prefill throughput: n prompts of l tokens computed in one engine step, after two
    warm-up steps (the median of five).
    The floor is the larger of two times: the bf16 matrix-unit time of 2·(active params)·
    tokens FLOPs (attention's quadratic term added) at the measured GEMM rate, and the bytes
    the step must move (dense weights, the distinct experts its tokens' random picks activate
    in expectation, the KV it writes) at the measured copy bandwidth. Shapes in
    ``kernel_tables`` get one more step, profiled kernel by kernel. The engine runs its steps
    synchronously: an overlapped ``step()`` returns once the prefill is launched, before the
    GPU has run it (sessions 2-10 timed that launch, not the prefill)."""
    tokens_max = max(n * length for n, length in shapes)
    cfg = EngineConfig(
        model=model,
        model_dir=None,
        device="cuda",
        dtype="bfloat16",
        num_kv_blocks=max(tokens_max // 16 * 2 + 64, 4096 // 16 + 1),
        max_num_seqs=64,
        max_num_batched_tokens=tokens_max,
        max_model_len=4096,
        enable_prefix_caching=False,
        seed=seed,
        async_scheduling=False,
    )
    engine = LLMEngine(cfg)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    flops_rate = 10 * 2 * 8192**3 / (time.perf_counter() - t0)
    del a
    bw = copy_bandwidth()
    rng = random.Random(seed)
    m = model
    active = m.num_layers * (
        2 * m.q_size * m.hidden_size
        + 2 * m.kv_size * m.hidden_size
        + m.top_k * 3 * m.moe_intermediate_size * m.hidden_size
    )

    def prefill_step(n: int, length: int, profiled: bool = False):
        params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        for _ in range(n):
            engine.add_request([rng.randrange(m.vocab_size) for _ in range(length)], params)
        torch.cuda.synchronize()
        if profiled:
            engine.executor.call("moebius.bench.gpu_timing:profile_start")
        t = time.perf_counter()
        engine.step()
        took = time.perf_counter() - t
        table = (engine.executor.call("moebius.bench.gpu_timing:profile_stop")[0]
                 if profiled else None)
        while engine.has_unfinished():
            engine.step()
        return took, table

    rows = []
    for n, length in shapes:
        # Two untimed runs a shape (the first compiles), then the median of five: with one and
        # three, the first process on a fresh machine timed 1x2048 at 63.2 and 48.6 ms where
        # later processes took 44.6-44.7 (one H100, session 14; compiles past the first step,
        # cached on disk for the next process, would do that).
        for _ in range(2):
            prefill_step(n, length)
        step = sorted(prefill_step(n, length)[0] for _ in range(5))[2]
        attn = m.num_layers * n * 2 * length * length * m.num_heads * m.head_dim  # causal ½·4
        compute = (2 * active * n * length + attn) / flops_rate
        need = step_floor_bytes(m, n * length, 1)  # its kv: one row a token, here written
        memory = (need["weights"] + need["kv"]) / bw
        floor = max(compute, memory)
        rows.append(
            {
                "prompts": n,
                "prompt_len": length,
                "step_ms": step * 1e3,
                "tokens_per_s": n * length / step,
                "floor_ms": floor * 1e3,
                "x_floor": step / floor,
                "compute_floor_ms": compute * 1e3,
                "memory_floor_ms": memory * 1e3,
                "gemm_tflops": flops_rate / 1e12,
                "copy_bw_GBps": bw / 1e9,
            }
        )
        print(json.dumps(rows[-1]))
        if f"{n}x{length}" in kernel_tables:
            print_kernel_table(prefill_step(n, length, profiled=True)[1],
                               f"prefill {n}x{length}: kernels of one step")
    engine.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=None, help="override layer count")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 16, 64, 256])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    cli.async_scheduling_arg(ap)
    ap.add_argument("--prefill", nargs="*", default=[], help="shapes like 1x2048 16x512")
    ap.add_argument("--kernel-tables", type=int, nargs="*", default=[],
                    help="print the graph's kernels at these batches")
    ap.add_argument("--prefill-kernel-tables", nargs="*", default=[],
                    help="print a prefill step's kernels at these shapes (like 1x2048)")
    ap.add_argument("--max-model-len", type=int, default=4096,
                    help="the engine's longest context (CUDA graphs size attention for it)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="decode requests' sampling (0: greedy, as the floors assume)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    over = {"num_hidden_layers": args.layers} if args.layers else {}
    model = preset(args.preset, **over)
    rows = []
    if args.batches:
        overlap = cli.async_scheduling(args)
        rows = run(
            model, args.batches, args.prompt_len, args.steps, args.warmup, device=args.device,
            async_scheduling=overlap, kernel_tables=args.kernel_tables,
            max_model_len=args.max_model_len, temperature=args.temperature, top_p=args.top_p,
        )
    shapes = [tuple(map(int, s.split("x"))) for s in args.prefill]
    prefill = run_prefill(model, shapes, kernel_tables=args.prefill_kernel_tables) if shapes else []
    for r in prefill:
        print(
            f"prefill {r['prompts']}x{r['prompt_len']}: {r['tokens_per_s']:.0f} tok/s, "
            f"{r['step_ms']:.1f} ms, floor {r['floor_ms']:.1f} ms ({r['x_floor']:.2f}x; compute "
            f"{r['compute_floor_ms']:.1f}, memory {r['memory_floor_ms']:.1f})"
        )
    print(
        f"\n{'batch':>6} {'ms/step':>9} {'tok/s':>9} {'floor ms':>9} {'x floor':>8} "
        f"{'gpu ms':>8} {'host ms':>8}"
    )
    # overlapped steps: ms/step is the slower of host and device; "host ms" is then what the
    # host adds beyond the device's step (near 0 when fully hidden)
    for r in rows:
        gpu = "-" if r["gpu_ms"] is None else f"{r['gpu_ms']:.2f}"
        host = "-" if r["host_ms"] is None else f"{r['host_ms']:.2f}"
        print(
            f"{r['batch']:>6} {r['step_ms']:>9.2f} {r['tokens_per_s']:>9.1f} "
            f"{r['floor_ms']:>9.2f} {r['x_floor']:>8.2f} {gpu:>8} {host:>8}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "preset": args.preset,
                    "rows": rows,
                    "prefill": prefill,
                    "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
