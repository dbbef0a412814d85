"""``moebius sim calibrate | validate | refit | run | project | pd``: flags mapped onto the
simulator here.

``add_sim_parser(subparsers)`` registers the command; ``moebius/cli.py`` calls it.
"""

from __future__ import annotations

import argparse
import json

from moebius.config import ModelConfig, preset


def _links(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="h200", help="profile name or JSON path")
    p.add_argument(
        "--nvlink-gbps",
        type=float,
        default=None,
        help="GPU-pair link inside a node, GB/s per direction (default: profile's)",
    )
    p.add_argument(
        "--ib-gbps",
        type=float,
        default=None,
        help="InfiniBand per GPU, GB/s (400 Gb/s = 50; default: profile's)",
    )


def _profile(args):
    from moebius.sim.cost_model import Link, Profile

    prof = Profile.load(args.profile)
    if args.nvlink_gbps:
        prof = prof.with_(p2p=Link(args.nvlink_gbps * 1e9, prof.p2p.latency_s))
    if args.ib_gbps:
        prof = prof.with_(inter_node=Link(args.ib_gbps * 1e9, prof.inter_node.latency_s))
    return prof


def _model(args) -> ModelConfig:
    if args.model_dir:
        return ModelConfig.from_dir(args.model_dir)
    return preset(args.preset)


def cmd_validate(args) -> None:
    from moebius.sim.validate import main

    rows = main(args.profile, leave_one_out=not args.no_loo)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                [
                    {**r.figure.__dict__, "predicted_ms": r.predicted_ms, "loo_ms": r.loo_ms}
                    for r in rows
                ],
                f,
                indent=2,
            )


def cmd_refit(args) -> None:
    from moebius.sim.refit import main

    main(args.md, args.json, args.profile_out)


def cmd_calibrate(args) -> None:
    import torch

    from moebius.sim.calibrate import calibrate
    from moebius.sim.cost_model import Profile

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    calibrate(
        args.preset,
        args.layers,
        args.batches,
        device,
        args.ranks,
        Profile.load(args.profile),
        args.out,
        steps=args.steps,
    )


def cmd_run(args) -> None:
    from moebius.engine.policy import AutoPolicy
    from moebius.sim import workloads
    from moebius.sim.cost_model import CostModel
    from moebius.sim.simulator import CostProfile, Simulator

    model = _model(args)
    cm = CostModel(model, args.ranks, _profile(args))
    if args.trace:
        arrivals = workloads.load(args.trace)
    elif args.workload == "rollout":
        arrivals = workloads.rollout(args.num, args.prompt_len, args.output_len, seed=args.seed)
    elif args.workload == "bursty":
        arrivals = workloads.bursty(
            args.num,
            args.rate / 4,
            args.rate * 2,
            seed=args.seed,
            prompt_len=args.prompt_len,
            mean_output=args.output_len,
        )
    else:
        arrivals = workloads.poisson(
            args.num, args.rate, args.prompt_len, args.output_len, seed=args.seed
        )
    policy = AutoPolicy(CostProfile(cm)) if args.policy == "auto" else None
    layout = args.layout or ("tp" if args.policy == "tp" else "ep")
    sim = Simulator(
        model,
        args.ranks,
        cm,
        layout=layout,
        policy=policy,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    res = sim.run(arrivals)
    summary = res.summary()
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**summary, "switches": [s.__dict__ for s in res.switches]}, f, indent=2)


def cmd_project(args) -> None:
    from moebius.sim.project import main

    prof = _profile(args)
    main(args.profile, args.out, args.quick, nvlink=prof.p2p, ib=prof.inter_node)


def cmd_pd(args) -> None:
    import platform
    import sys
    import time
    from dataclasses import replace
    from pathlib import Path

    from moebius.sim import pd_bench

    if args.workload == "sweep":
        workloads = list(pd_bench.SWEEP)
    else:
        trace = args.workload == "trace"
        workloads = [
            pd_bench.Workload(
                args.workload,
                kind=args.workload,
                preset=args.preset or ("deepseek-v2-lite" if trace else "qwen3-30b-a3b"),
                topics=args.topics,
                affinity=args.affinity,
                preferred=args.preferred,
                prompt_len=args.prompt_len,
                output_len=args.output_len,
                batch=args.batch,
                num=args.num,
            )
        ]
    if args.quick:
        workloads = [replace(w, num=w.num or 400, calib=128) for w in workloads]
    rows = []
    for w in workloads:
        got = pd_bench.run_workload(
            w,
            args.policies,
            num_prefill=args.prefill,
            num_decode=args.decode,
            tau=args.tau,
            load_cap=args.load_cap,
            seed=args.seed,
            profile=args.profile,
            data=args.data,
        )
        print(pd_bench.table(got), flush=True)
        rows += got
    argv = sys.argv[sys.argv.index("pd") + 1 :] if "pd" in sys.argv else []
    cmd = " ".join(["moebius sim pd", *argv])
    head = (
        f"`{cmd}`: {args.prefill} prefill + {args.decode} decode instances (one GPU each), "
        f"simulated with the {args.profile} cost model on this {platform.machine()} CPU, "
        f"{time.strftime('%Y-%m-%d')}, {sum(r['seconds'] for r in rows) / len(args.policies):.0f}"
        " s.\n\n"
    )
    text = head + pd_bench.table(rows)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1, default=float))
    Path(args.md or out.with_suffix(".md")).write_text(text)


def add_sim_parser(subparsers) -> None:
    """Register ``sim`` and its subcommands on the main parser's ``subparsers``."""
    sim = subparsers.add_parser("sim", help="simulate deployments with a calibrated cost model")
    sub = sim.add_subparsers(dest="sim_command", required=True)

    p = sub.add_parser("validate", help="predicted vs measured H200 step times")
    p.add_argument("--profile", default="h200")
    p.add_argument("--no-loo", action="store_true", help="skip the leave-one-out refits")
    p.add_argument("--json", default=None)
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("refit", help="the H200 profile refit: before/after on the engine's steps")
    p.add_argument("--md", default=None, help="write the markdown report here")
    p.add_argument("--json", default=None, help="write the rows and constants here")
    p.add_argument("--profile-out", default=None, help="write fit_profile(figures.ALL) here")
    p.set_defaults(fn=cmd_refit)

    p = sub.add_parser("calibrate", help="run the real engine here and fit a profile")
    p.add_argument("--preset", default="qwen3-30b-a3b", help="a preset, or 'tiny' (CPU smoke)")
    p.add_argument("--layers", type=int, default=None, help="override the layer count")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--ranks", type=int, default=1, help="> 1: also time collectives")
    p.add_argument("--profile", default="h200", help="base profile for what is not measured")
    p.add_argument("--out", default="profile.json")
    p.set_defaults(fn=cmd_calibrate)

    p = sub.add_parser("run", help="simulate one instance over a workload")
    p.add_argument("--preset", default="qwen3-235b-a22b")
    p.add_argument("--model-dir", default=None, help="read config.json from here instead")
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--policy", choices=["tp", "ep", "auto"], default="auto")
    p.add_argument("--layout", choices=["tp", "ep"], default=None, help="initial layout")
    p.add_argument("--workload", choices=["rollout", "poisson", "bursty"], default="rollout")
    p.add_argument("--trace", default=None, help="JSON/CSV of (time, prompt_len, output_len)")
    p.add_argument("--num", type=int, default=512)
    p.add_argument("--rate", type=float, default=8.0, help="requests/s (poisson, bursty)")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=1024, help="mean output length")
    p.add_argument("--max-num-seqs", type=int, default=1024)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    _links(p)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("pd", help="decode-routing policies on a simulated PD deployment")
    p.add_argument("--prefill", type=int, default=8, help="prefill instances")
    p.add_argument("--decode", type=int, default=16, help="decode instances")
    p.add_argument(
        "--policies",
        nargs="+",
        default=["eldr", "eldr_cap", "least_load", "round_robin", "random"],
        choices=["eldr", "eldr_cap", "least_load", "round_robin", "random"],
        help="eldr_cap: eldr with --load-cap",
    )
    p.add_argument(
        "--workload",
        choices=["topics", "trace", "sweep"],
        default="topics",
        help="synthetic topic locality, the real routing trace, or the BENCHMARKS sweep",
    )
    p.add_argument("--preset", default=None, help="model shapes (default: by workload)")
    p.add_argument("--topics", type=int, default=16, help="domains in the mix (topics)")
    p.add_argument("--affinity", type=float, default=0.4, help="picks in the topic's experts")
    p.add_argument("--preferred", type=int, default=16, help="experts a topic prefers a layer")
    p.add_argument("--prompt-len", type=int, default=1024, help="mean prompt tokens (topics)")
    p.add_argument("--output-len", type=int, default=256, help="mean output tokens")
    p.add_argument("--batch", type=int, default=32, help="in-flight requests per decode inst.")
    p.add_argument("--num", type=int, default=0, help="requests (0: 4x the concurrency)")
    p.add_argument("--tau", type=float, default=0.1, help="ELDR similarity slack")
    p.add_argument(
        "--load-cap", type=float, default=1.25, help="eldr_cap: in-flight cap, x fair share"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="/work/shared/data/routing-deepseek-v2-lite-puffin-1-1000.npz")
    p.add_argument("--profile", default="h200")
    p.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    p.add_argument("--out", default="results/sim_pd.json")
    p.add_argument("--md", default=None, help="markdown path (default: --out with .md)")
    p.set_defaults(fn=cmd_pd)

    p = sub.add_parser("project", help="the 8×H200 and multi-node projection tables")
    p.add_argument("--out", default=None, help="write the markdown here")
    p.add_argument("--quick", action="store_true", help="smaller workloads")
    _links(p)
    p.set_defaults(fn=cmd_project)
