"""``moebius bench ...``: the layout benchmark (static TP, static EP and auto on one workload).

Registered by ``moebius/cli.py`` through ``add_bench_parser(sub)``; the flags are
``harness.add_args``'s, so ``python -m moebius.bench.harness`` and ``moebius bench`` agree.
"""

from __future__ import annotations

import argparse


def cmd_bench(args: argparse.Namespace) -> None:
    from moebius.bench.harness import main_args

    main_args(args)


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench`` sub-command to ``subparsers`` (from ``add_subparsers``)."""
    from moebius.bench.harness import add_args

    p = subparsers.add_parser(
        "bench", help="static TP vs static EP vs auto on one workload (JSON + PNG plots)"
    )
    add_args(p)
    p.set_defaults(fn=cmd_bench)
    return p
