"""Command line of disaggregated serving: `moebius route`, `moebius eldr calibrate`, and the
role flags of `moebius serve` (`--role prefill|decode|both --kv-store HOST:PORT`).

moebius/cli.py registers `add_route_parser`, `add_eldr_parser` and `add_role_args`; until it
does, `python -m moebius.disagg.cli serve|route|eldr ...` offers the same commands.
"""

from __future__ import annotations

import argparse
import logging


def add_role_args(p: argparse.ArgumentParser) -> None:
    """`--role` and `--kv-store` for a serve parser (see `serve_with_role`)."""
    p.add_argument("--role", choices=["prefill", "decode", "both"], default="both")
    p.add_argument(
        "--kv-store", default=None, help="HOST:PORT of the TCPStore for KV transfer (roles)"
    )


def serve_with_role(args, cfg) -> bool:
    """Serve a prefill or decode instance when ``args.role`` asks for one; returns False for
    `both` (the caller runs the ordinary server)."""
    if getattr(args, "role", "both") == "both":
        return False
    if not args.kv_store:
        raise ValueError("--role prefill|decode needs --kv-store HOST:PORT")
    from moebius.cli import server_kwargs
    from moebius.disagg.handoff import run_role_server

    run_role_server(cfg, args.role, args.kv_store, **server_kwargs(args))
    return True


def cmd_route(args) -> None:
    import uvicorn

    from moebius.disagg.eldr import EldrModel, make_policy
    from moebius.disagg.router import create_router_app

    model = EldrModel.load(args.eldr_model) if args.eldr_model else None
    if args.policy == "eldr" and model is None:
        raise ValueError("--policy eldr needs --eldr-model FILE (moebius eldr calibrate)")
    if model is not None and model.num_workers != len(args.decode):
        raise ValueError(
            f"the ELDR model has {model.num_workers} centroids, "
            f"for {len(args.decode)} decode instances"
        )
    store = None
    if args.kv_store:  # the router hosts the rendezvous store of the instances' transfers
        from datetime import timedelta

        import torch.distributed as dist

        host, port = args.kv_store.rsplit(":", 1)
        store = dist.TCPStore(
            host, int(port), is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60)
        )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per proxied call
    policy = make_policy(
        args.policy, model=model, tau=args.tau, seed=args.seed, load_cap=args.eldr_load_cap or None
    )
    app = create_router_app(args.prefill, args.decode, policy, kv_store=store)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def add_route_parser(sub) -> None:
    p = sub.add_parser("route", help="prefill/decode router (OpenAI-compatible front)")
    p.add_argument("--prefill", nargs="+", required=True, metavar="URL")
    p.add_argument("--decode", nargs="+", required=True, metavar="URL")
    p.add_argument(
        "--policy", choices=["eldr", "least_load", "round_robin", "random"], default="least_load"
    )
    p.add_argument("--eldr-model", default=None, help="file from `moebius eldr calibrate`")
    p.add_argument("--tau", type=float, default=0.1, help="ELDR similarity slack")
    p.add_argument(
        "--eldr-load-cap",
        type=float,
        default=1.25,
        help="ELDR: skip instances with at least this many times their fair share in flight "
        "(0: off, the bare rule); 1.25 keeps p99 TPOT at or below round robin's (docs/eldr.md)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random policy")
    p.add_argument("--kv-store", default=None, help="host the instances' TCPStore at HOST:PORT")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(fn=cmd_route)


def cmd_eldr_calibrate(args) -> None:
    from moebius.disagg.calibrate import calibrate_from_prompts, calibrate_from_trace

    if args.data:
        model = calibrate_from_trace(args.data, args.workers, seed=args.seed)
    elif args.model and args.prompts:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = calibrate_from_prompts(
            args.model,
            args.prompts,
            args.workers,
            seed=args.seed,
            max_tokens=args.max_tokens,
            device=device,
            ranks=args.ranks,
            dtype=args.dtype,
        )
    else:
        raise ValueError("give --data TRACE.npz, or --model DIR --prompts FILE")
    model.save(args.out)
    print(
        f"wrote {args.out}: {model.num_workers} centroids over layers {model.layers} "
        f"(calibration Spearman {model.calib_spearman:.3f})"
    )


def add_eldr_parser(sub) -> None:
    p = sub.add_parser("eldr", help="ELDR decode-routing model")
    esub = p.add_subparsers(dest="eldr_cmd", required=True)
    c = esub.add_parser("calibrate", help="fit signatures and one centroid per decode instance")
    c.add_argument("--workers", type=int, required=True, help="number of decode instances")
    c.add_argument("--out", required=True, help="output .npz (for `moebius route --eldr-model`)")
    c.add_argument("--data", default=None, help="recorded routing trace (.npz, prompt halves)")
    c.add_argument("--model", default=None, help="checkpoint folder to run --prompts through")
    c.add_argument("--prompts", default=None, help="text file, one calibration prompt a line")
    c.add_argument("--max-tokens", type=int, default=32, help="decode tokens per prompt")
    c.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available"
    )
    c.add_argument("--ranks", type=int, default=1, help="GPUs of the local engine (--prompts)")
    c.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(fn=cmd_eldr_calibrate)


def main(argv: list[str] | None = None) -> None:
    """``python -m moebius.disagg.cli serve|route|eldr ...``: the same as ``moebius ...``."""
    from moebius.cli import main as cli_main

    cli_main(argv)


if __name__ == "__main__":
    main()
