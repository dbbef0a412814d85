"""Multi-rank measurements of the real engine: TP vs EP decode across batch sizes (the
crossover), switch time at several KV fills, and the time of every step through a switch
(all at once vs progressive).

    python -m moebius.bench.multirank --preset qwen3-30b-a3b --ranks 2 \\
        --batches 1 4 16 64 256 1024 2048 --switch-fills 0 0.5 0.9 \\
        --through-switch 64 512 --out results/multirank.json

Random bf16 weights from a preset; one engine (one process per rank) serves every section, so
the layouts are compared on the same buffers and the switches are the engine's own. A decode
step is timed end to end through ``engine.step()`` (scheduling, inputs, forward, sampling).
The switch floor is the bytes a rank moves over the measured one-way peer bandwidth
(``--peer-gbps``, measured by ``moebius.bench.switch_transport``).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from moebius import cli
from moebius.bench.gpu_timing import print_kernel_table
from moebius.config import EngineConfig, ModelConfig, preset
from moebius.core import SamplingParams
from moebius.engine.llm_engine import LLMEngine
from moebius.engine.step_profile import abort_all, from_sweep, prefill_all


def _add(engine, n: int, prompt_len: int, max_tokens: int, rng: random.Random) -> None:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    V = engine.cfg.model.vocab_size
    for _ in range(n):
        engine.add_request([rng.randrange(V) for _ in range(prompt_len)], params)


def _to(engine: LLMEngine, layout: str) -> None:
    if engine.layout != layout:
        engine.switch(layout)
        engine.step()  # the switch happens at the step boundary (nothing in flight here)


def _gpu(engine, fn: str, B: int):
    return engine.executor.call(f"moebius.bench.gpu_timing:{fn}", B)


def decode_sweep(engine, layouts, batches, prompt_len, steps, warmup, rng,
                 kernel_tables=()) -> list[dict]:
    """Median decode step per (layout, batch): B requests prefilled, then ``steps`` timed;
    the GPU time of the step's graph alone (the slowest rank's), and at ``kernel_tables``
    batches rank 0's kernels."""
    rows = []
    for layout in layouts:
        _to(engine, layout)
        for B in batches:
            # early requests decode while later ones prefill: ask for more tokens than timed
            _add(engine, B, prompt_len, 1024, rng)
            prefill_all(engine)
            if len(engine.scheduler.running) < B:
                print(f"{layout} b{B}: only {len(engine.scheduler.running)} fit; skipped")
                abort_all(engine)
                continue
            for _ in range(warmup):
                engine.step()
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - t)
            cuda = engine.cfg.device == "cuda"
            gpu = _gpu(engine, "graph_replay_seconds", B) if cuda else [None]
            want_table = cuda and B in kernel_tables
            table = _gpu(engine, "graph_kernel_table", B)[0] if want_table else None
            abort_all(engine)
            step = statistics.median(times)
            gpu_s = None if None in gpu else max(gpu)
            rows.append({"layout": layout, "batch": B, "step_ms": step * 1e3,
                         "tokens_per_s": B / step, "min_ms": min(times) * 1e3,
                         "gpu_ms": gpu_s and gpu_s * 1e3,
                         "host_ms": gpu_s and (step - gpu_s) * 1e3})
            if table:
                rows[-1]["kernels_rank0"] = table
                print_kernel_table(table, f"{layout} b{B}: rank 0's kernels, one replay")
            print(json.dumps(rows[-1]), flush=True)
    return rows


def switch_times(engine, fills, prompt_len, peer_gbps, rng) -> list[dict]:
    """TP->EP then EP->TP with the KV pool ``fill`` full of running requests."""
    nb = engine.scheduler.num_blocks  # per manager: TP has one, EP one per rank
    capacity = min(nb["tp"], nb["ep"] * engine.cfg.ranks) * engine.cfg.block_size
    rows = []
    for fill in fills:
        _to(engine, "tp")
        # requests prefilled first decode while later ones prefill: room for 256 new tokens
        n = int(fill * capacity / (prompt_len + 256))
        if n:
            _add(engine, n, prompt_len, 256, rng)
            prefill_all(engine)
        for target in ("ep", "tp"):
            before = len(engine.switches)
            engine.switch(target)
            engine.step()
            rec = engine.switches[before]
            need = (rec.weight_bytes + rec.kv_bytes) / engine.cfg.ranks
            floor = need / (peer_gbps * 1e9)
            rows.append({
                "fill": fill, "kv_usage": engine.scheduler.kv_usage(),
                "direction": f"{rec.source}->{rec.target}", "running": rec.running,
                "preempted": rec.preempted, "seconds": rec.seconds,
                "weights_s": rec.phases.get("weights"), "kv_s": rec.phases.get("kv"),
                "other_s": rec.seconds - sum(rec.phases.values()),
                "weight_GB_per_rank": rec.weight_bytes / engine.cfg.ranks / 1e9,
                "kv_GB_per_rank": rec.kv_bytes / engine.cfg.ranks / 1e9,
                "weights_GBps": rec.weight_bytes / engine.cfg.ranks / rec.phases["weights"] / 1e9,
                "floor_s": floor, "x_floor": rec.seconds / floor if floor else None,
            })
            print(json.dumps(rows[-1]), flush=True)
        abort_all(engine)
    return rows


def through_switch(engine, batches, progressive, prompt_len, rng, before=6, after=40):
    """Every step's time while B requests decode through a TP->EP switch, all at once and
    progressively (``progressive`` layers a step)."""
    rows = []
    for B in batches:
        for k in (0, progressive):
            _to(engine, "tp")
            engine.progressive_layers = k
            _add(engine, B, prompt_len, before + after + 4, rng)
            prefill_all(engine)
            for _ in range(3):
                engine.step()
            times = []
            for i in range(before + after):
                if i == before:
                    engine.switch("ep")
                t = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - t)
            steady = statistics.median(times[:before])
            rec = engine.switches[-1]
            rows.append({"batch": B, "progressive_layers": k, "step_ms": [x * 1e3 for x in times],
                         "steady_ms": steady * 1e3, "worst_ms": max(times[before:]) * 1e3,
                         "worst_x_steady": max(times[before:]) / steady,
                         "switch_seconds": rec.seconds, "switch_step": before})
            print(json.dumps({k2: v for k2, v in rows[-1].items() if k2 != "step_ms"}), flush=True)
            abort_all(engine)
            engine.progressive_layers = 0
    return rows


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for layout in sorted({r["layout"] for r in rows}):
        rs = [r for r in rows if r["layout"] == layout]
        ax[0].plot([r["batch"] for r in rs], [r["tokens_per_s"] for r in rs], "o-", label=layout)
        ax[1].plot([r["batch"] for r in rs], [r["step_ms"] for r in rs], "o-", label=layout)
    for a, y in zip(ax, ("decode tokens/s", "time per output token (ms)"), strict=True):
        a.set_xscale("log", base=2)
        a.set_xlabel("concurrent requests")
        a.set_ylabel(y)
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--model-dir", default=None, help="a checkpoint instead of a preset")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--layouts", nargs="+", default=["tp", "ep"])
    ap.add_argument("--ep-exchange", default="allgather", choices=["allgather", "alltoall"])
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 4, 16, 64, 256, 1024, 2048])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--switch-fills", type=float, nargs="*", default=[])
    ap.add_argument("--switch-prompt-len", type=int, default=2048)
    ap.add_argument("--through-switch", type=int, nargs="*", default=[])
    ap.add_argument("--progressive-layers", type=int, default=4)
    ap.add_argument("--peer-gbps", type=float, default=396.0)
    ap.add_argument("--kernel-tables", type=int, nargs="*", default=[],
                    help="batches at which to print rank 0's kernels of one graph replay")
    ap.add_argument("--enforce-eager", action="store_true")
    cli.async_scheduling_arg(ap)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--profile-out", default=None,
                    help="also write the sweep as a step profile (the harness's --profile)")
    args = ap.parse_args()
    over = {"num_hidden_layers": args.layers} if args.layers else {}
    model = ModelConfig.from_dir(args.model_dir) if args.model_dir else preset(args.preset, **over)
    top = max(args.batches + args.through_switch + [1])
    cfg = EngineConfig(
        model=model, model_dir=args.model_dir, device=args.device,
        dtype="bfloat16" if args.device == "cuda" else "float32", ranks=args.ranks,
        layout="tp", max_num_seqs=max(top, 4096), max_num_batched_tokens=8192,
        max_model_len=min(max(4096, args.switch_prompt_len + 64), model.max_position_embeddings),
        enable_prefix_caching=False,
        ep_exchange=args.ep_exchange, enforce_eager=args.enforce_eager,
        async_scheduling=cli.async_scheduling(args),
    )
    t0 = time.perf_counter()
    engine = LLMEngine(cfg)
    print(f"engine up in {time.perf_counter() - t0:.1f} s")
    print(engine.memory_summary())
    rng = random.Random(0)
    out = {"preset": args.preset, "ranks": args.ranks, "ep_exchange": args.ep_exchange,
           "memory": engine.memory, "startup_s": engine.startup_seconds}
    if args.batches:
        out["decode"] = decode_sweep(engine, args.layouts, args.batches, args.prompt_len,
                                     args.steps, args.warmup, rng, args.kernel_tables)
        if args.plot:
            plot(out["decode"], args.plot, f"{args.preset}, {args.ranks} ranks, "
                 f"EP exchange {args.ep_exchange}")
    if args.switch_fills:
        out["switch"] = switch_times(engine, args.switch_fills, args.switch_prompt_len,
                                     args.peer_gbps, rng)
    if args.through_switch:
        out["through_switch"] = through_switch(engine, args.through_switch,
                                               args.progressive_layers, args.prompt_len, rng)
    engine.shutdown()
    if args.profile_out and out.get("decode"):
        switch = {r["direction"]: r["seconds"] for r in out.get("switch", []) if not r["fill"]}
        from_sweep(out["decode"], args.prompt_len + args.warmup + args.steps // 2, switch,
                   {"source": "moebius.bench.multirank", "preset": args.preset,
                    "ranks": args.ranks, "ep_exchange": args.ep_exchange}).save(args.profile_out)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    print(f"\n{'layout':>6} {'batch':>6} {'ms/step':>9} {'tok/s':>10} {'gpu ms':>8} {'host ms':>8}")
    for r in out.get("decode", []):
        gpu = "-" if r["gpu_ms"] is None else f"{r['gpu_ms']:.2f}"
        host = "-" if r["host_ms"] is None else f"{r['host_ms']:.2f}"
        print(f"{r['layout']:>6} {r['batch']:>6} {r['step_ms']:>9.2f} {r['tokens_per_s']:>10.0f} "
              f"{gpu:>8} {host:>8}")
    for r in out.get("switch", []):
        print(f"switch fill {r['fill']:.0%} {r['direction']}: {r['seconds'] * 1e3:.1f} ms "
              f"(weights {r['weights_s'] * 1e3:.1f} ms {r['weights_GBps']:.0f} GB/s, kv "
              f"{r['kv_s'] * 1e3:.1f} ms {r['kv_GB_per_rank']:.2f} GB/rank) "
              f"{r['x_floor']:.2f}x floor")
    for r in out.get("through_switch", []):
        print(f"through switch b{r['batch']} progressive={r['progressive_layers']}: steady "
              f"{r['steady_ms']:.1f} ms, worst {r['worst_ms']:.1f} ms "
              f"({r['worst_x_steady']:.2f}x), "
              f"switch {r['switch_seconds'] * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
