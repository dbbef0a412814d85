"""Static TP, static EP and auto on the same workload, in one invocation, on the real engine.

    python -m moebius.bench.harness --preset qwen3-30b-a3b --ranks 2 --workload rollout \
        --num-prompts 2048 --output-mean 1024 --output-cap 8192 --out results/rollout.json

One engine serves all three runs (same weights, same compiled runtimes; prefix caching off, so
no run warms another's cache); between runs it is switched to the run's starting layout. The
step-time profile is measured on start-up (or read from its cache) and drives ``AutoPolicy``.
Recorded per run: every step's time, batch size, layout and new tokens; each switch; TTFT and
TPOT per request (from the request's intended arrival, so queueing counts); wall time per
rollout iteration. ``plots.py`` draws the PNGs from the JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict

from moebius.bench import workloads as wl
from moebius.config import EngineConfig, ModelConfig, preset
from moebius.core import SamplingParams
from moebius.engine.llm_engine import LLMEngine
from moebius.engine.policy import AutoConfig, AutoPolicy, ManualPolicy, SwitchPolicy
from moebius.engine.step_profile import StepProfile, load_or_measure

log = logging.getLogger("moebius.bench")
MODES = ("tp", "ep", "auto")


class _Recorder(SwitchPolicy):
    """Wraps the run's policy and records what the engine reports after each step."""

    def __init__(self, inner: SwitchPolicy, t0: float) -> None:
        self.inner, self.t0 = inner, t0
        self.steps: dict[str, list] = {"t": [], "seconds": [], "batch": [], "layout": []}
        self.switches: list[dict] = []

    def decide(self, snap):
        return self.inner.decide(snap)

    def observe_step(self, layout: str, batch_size: int, seconds: float) -> None:
        s = self.steps
        s["t"].append(time.monotonic() - self.t0)
        s["seconds"].append(seconds)
        s["batch"].append(batch_size)
        s["layout"].append(layout)
        self.inner.observe_step(layout, batch_size, seconds)

    def observe_switch(self, rec) -> None:
        self.switches.append(
            {
                "t": time.monotonic() - self.t0,
                "step": rec.step,
                "source": rec.source,
                "target": rec.target,
                "seconds": rec.seconds,
                "weight_bytes": rec.weight_bytes,
                "kv_bytes": rec.kv_bytes,
                "running": rec.running,
            }
        )
        self.inner.observe_switch(rec)


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _set_layout(engine: LLMEngine, layout: str) -> None:
    engine.policy = ManualPolicy()
    if engine.layout != layout:
        engine.switch(layout)
        engine.step()  # nothing in flight: applies the switch only


def warm_up(engine: LLMEngine, workload: wl.Workload, layouts: list[str],
            num_prompts: int = 256) -> dict[str, float]:
    """Serve the workload's first prompts (a few tokens each) once in every layout before any
    timed run: kernels compile for new shapes on first use (Triton JIT, cuBLAS heuristics), and
    without this the first run of each layout pays for it (seen on 2xH200: up to 1.2 s a step,
    ~9 s of a 40 s rollout). Returns seconds per layout."""
    specs = sorted(workload.iterations[0], key=lambda s: s.arrival)[:num_prompts]
    vocab = engine.cfg.model.vocab_size
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    seconds = {}
    for layout in layouts:
        _set_layout(engine, layout)
        t0 = time.monotonic()
        for i, spec in enumerate(specs):
            engine.add_request(spec.prompt_ids(vocab), params, request_id=f"warm-{layout}-{i}")
        while engine.has_unfinished():
            engine.step()
        seconds[layout] = time.monotonic() - t0
        log.info("warm-up in %s: %d prompts, %.1f s", layout, len(specs), seconds[layout])
    return seconds


def run_mode(
    engine: LLMEngine,
    workload: wl.Workload,
    mode: str,
    profile: StepProfile | None,
    auto_cfg: AutoConfig,
    time_scale: float = 1.0,
    auto_start: str = "tp",
) -> dict:
    """Run ``workload`` once in ``mode`` ("tp", "ep", "auto"); returns the run's record."""
    _set_layout(engine, auto_start if mode == "auto" else mode)
    inner = AutoPolicy(profile, auto_cfg) if mode == "auto" else ManualPolicy()
    t0 = time.monotonic()
    rec = _Recorder(inner, t0)
    engine.policy = rec
    vocab = engine.cfg.model.vocab_size
    produced: dict[str, int] = {}
    requests: list[dict] = []
    tokens_per_step: list[int] = []
    iteration_seconds: list[float] = []
    for it, specs in enumerate(workload.iterations):
        it_start = time.monotonic()
        todo = sorted(specs, key=lambda s: s.arrival)
        arrivals: dict[str, float] = {}
        i = finished = 0
        while i < len(todo) or engine.has_unfinished():
            now = time.monotonic()
            if workload.mode == "closed":
                while i < len(todo) and i - finished < workload.concurrency:
                    i = _add(engine, todo[i], i, it, vocab, arrivals, now)
            else:
                while i < len(todo) and it_start + todo[i].arrival * time_scale <= now:
                    spec = todo[i]
                    i = _add(
                        engine, spec, i, it, vocab, arrivals, it_start + spec.arrival * time_scale
                    )
            if not engine.has_unfinished():
                if i < len(todo):
                    time.sleep(max(0.0, it_start + todo[i].arrival * time_scale - time.monotonic()))
                continue
            observed = len(rec.steps["t"])
            outs = engine.step()
            new = 0
            now = time.monotonic()
            for out in outs:
                n = len(out.outputs[0].token_ids)
                new += n - produced.get(out.request_id, 0)
                produced[out.request_id] = n
                if out.finished:
                    finished += 1
                    first = out.metrics["first_token_time"] or now
                    arr = arrivals[out.request_id]
                    requests.append(
                        {
                            "iteration": it,
                            "arrival": arr - t0,
                            "ttft": first - arr,
                            "tpot": (now - first) / (n - 1) if n > 1 else None,
                            "output_len": n,
                        }
                    )
            if len(rec.steps["t"]) > observed:  # a step ran (an empty one reports nothing)
                tokens_per_step.append(new)
        iteration_seconds.append(time.monotonic() - it_start)
    wall = time.monotonic() - t0
    ttft = [r["ttft"] for r in requests]
    tpot = [r["tpot"] for r in requests if r["tpot"] is not None]
    total = sum(r["output_len"] for r in requests)
    out = {
        "mode": mode,
        "wall_seconds": wall,
        "iteration_seconds": iteration_seconds,
        "output_tokens": total,
        "tokens_per_second": total / wall,
        "ttft_p50": _pct(ttft, 0.5),
        "ttft_p99": _pct(ttft, 0.99),
        "tpot_p50": _pct(tpot, 0.5),
        "tpot_p99": _pct(tpot, 0.99),
        "num_switches": len(rec.switches),
        "switch_seconds": sum(s["seconds"] for s in rec.switches),
        "steps": {**rec.steps, "tokens": tokens_per_step},
        "switches": rec.switches,
        "requests": requests,
    }
    if mode == "auto":
        out["decisions"] = [
            {
                "step": d.step,
                "layout": d.layout,
                "batch": d.batch,
                "target": d.target,
                "reason": d.reason,
            }
            for d in inner.decisions
            if d.action == "switch"
        ]
    log.info(
        "%s: %.2f s, %.1f tok/s, %d switches, TTFT p50 %s, TPOT p50 %s",
        mode,
        wall,
        out["tokens_per_second"],
        len(rec.switches),
        out["ttft_p50"],
        out["tpot_p50"],
    )
    return out


def _add(engine, spec, i, it, vocab, arrivals, arrival) -> int:
    params = SamplingParams(temperature=0, max_tokens=spec.output_len, ignore_eos=True)
    rid = engine.add_request(spec.prompt_ids(vocab), params, request_id=f"w{it}-{i}")
    arrivals[rid] = arrival
    return i + 1


def engine_config(args) -> EngineConfig:
    if args.model_dir:
        model, model_dir = ModelConfig.from_dir(args.model_dir), args.model_dir
    else:
        over = {"num_hidden_layers": args.layers} if args.layers else {}
        model, model_dir = preset(args.preset, **over), None
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "auto")
    return EngineConfig(
        model=model,
        model_dir=model_dir,
        ranks=args.ranks,
        layout="tp",
        device=args.device,
        dtype=dtype,
        num_kv_blocks=args.num_kv_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_prefix_caching=False,
        seed=args.seed,
    )


def make_workload(args) -> wl.Workload:
    kw = {
        "seed": args.seed,
        "prompt_mean": args.prompt_mean,
        "output_mean": args.output_mean,
        "output_cap": args.output_cap,
    }
    if args.workload == "rollout":
        kw |= {"num_prompts": args.num_prompts, "iterations": args.iterations}
    elif args.workload == "steady":
        kw |= {"concurrency": args.concurrency, "num_requests": args.num_prompts}
    else:
        kw |= {"duration": args.duration, "rate_on": args.rate_on, "rate_off": args.rate_off}
    return wl.make(args.workload, **kw)


def run(args) -> dict:
    workload = make_workload(args)
    engine = LLMEngine(engine_config(args))
    try:
        if args.profile and os.path.exists(args.profile):
            profile = StepProfile.load(args.profile)
        else:
            profile = load_or_measure(
                engine,
                cache_dir=args.profile_cache,
                refresh=args.refresh_profile,
                batches=tuple(args.profile_batches),
                contexts=tuple(args.profile_contexts),
                steps=args.profile_steps,
            )
        auto_cfg = AutoConfig(
            horizon_steps=args.horizon,
            margin=args.margin,
            hysteresis=args.hysteresis,
            min_dwell_steps=args.dwell_steps,
        )
        layouts = sorted({args.auto_start if m == "auto" else m for m in args.modes}
                         | ({"tp", "ep"} if "auto" in args.modes else set()))
        warm = {}
        if args.warmup_prompts:
            warm = warm_up(engine, workload, layouts, args.warmup_prompts)
        runs = {
            m: run_mode(engine, workload, m, profile, auto_cfg, args.time_scale, args.auto_start)
            for m in args.modes
        }
    finally:
        engine.shutdown()
    cfg = engine.cfg
    return {
        "command": "moebius bench",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "model": args.model_dir or args.preset,
        "layers": cfg.model.num_layers,
        "ranks": cfg.ranks,
        "device": cfg.device,
        "dtype": cfg.dtype,
        "workload": {
            "name": workload.name,
            "mode": workload.mode,
            "params": workload.params,
            "num_requests": len(workload.requests),
        },
        "auto_config": asdict(auto_cfg),
        "profile": profile.to_json(),
        "warm_up_seconds": warm,
        "runs": runs,
    }


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="qwen3-30b-a3b")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layers")
    p.add_argument("--model-dir", default=None, help="a checkpoint instead of a preset")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--dtype", default=None)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=2048)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workload", choices=list(wl.WORKLOADS), default="rollout")
    p.add_argument("--num-prompts", type=int, default=2048, help="rollout/steady requests")
    p.add_argument("--iterations", type=int, default=1, help="rollout steps")
    p.add_argument("--concurrency", type=int, default=64, help="steady")
    p.add_argument("--duration", type=float, default=60.0, help="bursty, seconds")
    p.add_argument("--rate-on", type=float, default=20.0)
    p.add_argument("--rate-off", type=float, default=1.0)
    p.add_argument("--prompt-mean", type=float, default=256)
    p.add_argument("--output-mean", type=float, default=1024)
    p.add_argument("--output-cap", type=int, default=8192)
    p.add_argument("--time-scale", type=float, default=1.0, help="stretch arrival times")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--auto-start", choices=["tp", "ep"], default="tp")
    p.add_argument("--warmup-prompts", type=int, default=256,
                   help="prompts served once per layout before the timed runs (0: none)")
    p.add_argument("--profile", default=None, help="a profile JSON to use instead of measuring")
    p.add_argument("--profile-cache", default=None)
    p.add_argument("--refresh-profile", action="store_true")
    p.add_argument(
        "--profile-batches", type=int, nargs="+", default=[1, 4, 16, 64, 128, 256, 512, 1024, 2048]
    )
    p.add_argument("--profile-contexts", type=int, nargs="+", default=[512])
    p.add_argument("--profile-steps", type=int, default=8)
    p.add_argument("--horizon", type=int, default=128)
    p.add_argument("--margin", type=float, default=2.0)
    p.add_argument("--hysteresis", type=float, default=0.10)
    p.add_argument("--dwell-steps", type=int, default=16)
    p.add_argument("--out", default="results/bench.json")
    p.add_argument("--plots", default=None, help="folder for PNGs (default: next to --out)")


def main_args(args) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = run(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f)
    from moebius.bench.plots import plot_all

    stem = os.path.splitext(os.path.basename(args.out))[0]
    paths = plot_all(result, args.plots or os.path.dirname(os.path.abspath(args.out)), stem)
    print(summary_table(result))
    print("wrote", args.out, *paths)
    return result


def summary_table(result: dict) -> str:
    rows = [
        f"{'mode':<5} {'wall s':>8} {'tok/s':>9} {'switches':>8} {'TTFT p50/p99 ms':>17} "
        f"{'TPOT p50/p99 ms':>17}"
    ]
    for m, r in result["runs"].items():
        ms = [
            x * 1e3 if x is not None else float("nan")
            for x in (r["ttft_p50"], r["ttft_p99"], r["tpot_p50"], r["tpot_p99"])
        ]
        rows.append(
            f"{m:<5} {r['wall_seconds']:>8.2f} {r['tokens_per_second']:>9.1f} "
            f"{r['num_switches']:>8d} {ms[0]:>8.1f}/{ms[1]:<8.1f} {ms[2]:>8.1f}/"
            f"{ms[3]:<8.1f}"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_args(ap)
    main_args(ap.parse_args())
