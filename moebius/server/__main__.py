"""``python -m moebius.server MODEL_DIR [--ranks N --layout tp|ep --port P ...]``: the same
server as ``moebius serve``, with the same engine flags."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from moebius.cli import engine_args, engine_config, server_kwargs
from moebius.server.serve import run_server


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="[moebius] %(message)s")
    ap = argparse.ArgumentParser(
        prog="python -m moebius.server", description="OpenAI-compatible MoE server"
    )
    ap.add_argument("model", help="checkpoint folder")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default=os.environ.get("MOEBIUS_API_KEY"))
    ap.add_argument("--admin-key", default=os.environ.get("MOEBIUS_ADMIN_KEY"))
    ap.add_argument("--served-model-name", default=None)
    ap.add_argument(
        "--max-queue",
        type=int,
        default=1024,
        help="requests that may wait for their first token before 429",
    )
    ap.add_argument("--grace-seconds", type=float, default=30.0, help="SIGTERM drain period")
    engine_args(ap)
    args = ap.parse_args(argv)
    try:
        cfg = engine_config(args, args.model)
    except ValueError as e:
        sys.exit(f"moebius: error: {e}")
    run_server(cfg, **server_kwargs(args))


if __name__ == "__main__":
    main()
