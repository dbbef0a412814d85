"""Command line: ``moebius demo | generate | serve | route | eldr | bench | sim | make-tiny``.

Engine flags are mapped onto ``EngineConfig`` in one place (``engine_args`` / ``engine_config``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from moebius.config import EngineConfig, ModelConfig

_ASYNC = {"auto": None, "on": True, "off": False}


def async_scheduling_arg(p: argparse.ArgumentParser) -> None:
    """``--async-scheduling auto|on|off``; ``async_scheduling(args)`` reads it."""
    p.add_argument("--async-scheduling", choices=list(_ASYNC), default="auto",
                   help="schedule the next step while the device runs this one (auto: on for CUDA)")


def async_scheduling(args) -> bool | None:
    """``EngineConfig.async_scheduling`` from ``--async-scheduling`` (None: the device decides)."""
    return _ASYNC[args.async_scheduling]


def engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ranks", type=int, default=1, help="ranks (one process per GPU or CPU worker)")
    p.add_argument(
        "--layout",
        choices=["tp", "ep", "auto"],
        default="tp",
        help="layout; auto: start in TP and let the switch policy decide",
    )
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available"
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV blocks per rank (EP view)")
    p.add_argument(
        "--kv-cache-memory",
        type=byte_size,
        default=0,
        help="bytes of KV pool per rank, e.g. 20G or 512M (default: from "
        "--gpu-memory-utilization on CUDA, 64 MiB on CPU)",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="fraction of each GPU's memory the engine may hold; the KV pool gets what the "
        "weights, graphs and workspace leave",
    )
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs: eager decode")
    p.add_argument("--chat-template", default=None,
                   help="a Jinja chat template file (or its text) instead of the checkpoint's")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default="fcfs",
                   help="priority: requests' priority field orders admission and preemption "
                        "(lower first), as vLLM's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--progressive-layers",
        type=int,
        default=0,
        help="move this many layers per decode step at a switch (0: all at once)",
    )
    p.add_argument("--switch-schedule", default="", help="switch at engine steps, e.g. '5:ep,9:tp'")
    async_scheduling_arg(p)
    p.add_argument(
        "--ep-exchange",
        choices=["allgather", "alltoall"],
        default="allgather",
        help="how EP moves tokens to their experts' ranks (docs/decisions.md)",
    )


def parse_schedule(text: str) -> tuple[tuple[int, str], ...]:
    """'5:ep,9:tp' -> ((5, 'ep'), (9, 'tp'))."""
    if not text:
        return ()
    out = []
    for item in text.split(","):
        step, _, layout = item.partition(":")
        if not step.strip().isdigit() or not layout.strip():
            raise ValueError(f"--switch-schedule wants STEP:LAYOUT items, e.g. '5:ep,9:tp'; "
                             f"got {item!r}")
        out.append((int(step), layout.strip()))
    return tuple(out)


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def byte_size(text: str) -> int:
    """'20G', '512M', '1.5G', '4096' (binary units; a trailing 'iB' or 'B' is allowed)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _UNITS else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 20G, 512M)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a size must be >= 0, got {text!r}")
    return int(value * _UNITS[unit])


def engine_config(args, model_dir: str) -> EngineConfig:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return EngineConfig(
        model=ModelConfig.from_dir(model_dir),
        model_dir=model_dir,
        ranks=args.ranks,
        layout="tp" if args.layout == "auto" else args.layout,
        policy="auto" if args.layout == "auto" else "manual",
        device=device,
        dtype=args.dtype,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        chat_template=args.chat_template,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=not args.no_prefix_caching,
        scheduling_policy=args.scheduling_policy,
        seed=args.seed,
        switch_schedule=parse_schedule(args.switch_schedule),
        progressive_layers=args.progressive_layers,
        ep_exchange=args.ep_exchange,
        async_scheduling=async_scheduling(args),
    )


def cmd_make_tiny(args) -> None:
    from moebius.model.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(
        args.path,
        args.arch,
        seed=args.seed,
        num_shards=args.shards,
        fused_experts=args.fused,
        topics=args.topics,
    )
    print(f"wrote a tiny random {args.arch} checkpoint to {path}")


def cmd_generate(args) -> None:
    from moebius.core import SamplingParams

    cfg = engine_config(args, args.model)
    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        sys.exit("give --prompt TEXT (repeatable) or --prompts-file FILE")
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        seed=args.sampling_seed,
        n=args.n,
    )
    from moebius.llm import LLM

    llm = LLM.from_config(cfg)
    try:
        if args.chat:
            outs = llm.chat(
                [[{"role": "user", "content": p}] for p in prompts],
                params,
                use_tqdm=len(prompts) > 1,
            )
        else:
            outs = llm.generate(prompts, params, use_tqdm=len(prompts) > 1)
    finally:
        llm.shutdown()
    for p, o in zip(prompts, outs, strict=True):
        for c in o.outputs:
            if args.json:
                print(
                    json.dumps(
                        {
                            "prompt": p,
                            "text": c.text,
                            "token_ids": c.token_ids,
                            "finish_reason": c.finish_reason,
                        }
                    )
                )
            else:
                print(f"--- {p!r}\n{c.text!r}  [{c.finish_reason}]")


def cmd_serve(args) -> None:
    from moebius.disagg.cli import serve_with_role
    from moebius.server.serve import run_server

    cfg = engine_config(args, args.model)
    if serve_with_role(args, cfg):
        return
    run_server(cfg, **server_kwargs(args))


def server_kwargs(args) -> dict:
    """``run_server`` keyword arguments from the serve flags (shared by every serve entry)."""
    from moebius.server.tool_parsers import ToolCallConfig

    return dict(
        tool_calls=ToolCallConfig(args.tool_call_parser, args.enable_auto_tool_choice,
                                  args.reasoning_parser),
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        admin_key=args.admin_key,
        served_model_name=args.served_model_name,
        max_queue=args.max_queue,
        grace_seconds=getattr(args, "grace_seconds", 30.0),
    )


def cmd_demo(args) -> None:
    from moebius.demo import run_demo

    run_demo(args.model, ranks=args.ranks, steps=args.max_tokens)


def main(argv: list[str] | None = None) -> None:
    from moebius.bench.cli import add_bench_parser
    from moebius.disagg.cli import add_eldr_parser, add_role_args, add_route_parser
    from moebius.sim.cli import add_sim_parser

    logging.basicConfig(level=logging.INFO, format="[moebius] %(message)s")
    ap = argparse.ArgumentParser(prog="moebius", description="MoE serving engine")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_bench_parser(sub)

    p = sub.add_parser("demo", help="tiny random MoE on 2 CPU ranks with live EP<->TP switches")
    p.add_argument("--model", default=None, help="checkpoint folder (default: tiny, generated)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=24)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("make-tiny", help="write a tiny random checkpoint folder")
    p.add_argument("path")
    p.add_argument("--arch", choices=["qwen3_moe", "mixtral"], default="qwen3_moe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--fused", action="store_true", help="fused 3-D expert tensors")
    p.add_argument(
        "--topics",
        type=int,
        default=0,
        help="K > 1: synthetic expert locality by topic (model/topics.py)",
    )
    p.set_defaults(fn=cmd_make_tiny)

    p = sub.add_parser("generate", help="offline generation")
    p.add_argument("model")
    p.add_argument("--prompt", action="append", default=[])
    p.add_argument("--prompts-file")
    p.add_argument("--chat", action="store_true", help="apply the chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--sampling-seed", type=int, default=None)
    p.add_argument("--json", action="store_true")
    engine_args(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    p.add_argument("model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("MOEBIUS_API_KEY"))
    p.add_argument("--admin-key", default=os.environ.get("MOEBIUS_ADMIN_KEY"))
    p.add_argument("--served-model-name", default=None)
    p.add_argument(
        "--max-queue",
        type=int,
        default=1024,
        help="requests that may wait for their first token before 429",
    )
    p.add_argument("--grace-seconds", type=float, default=30.0, help="SIGTERM drain period")
    p.add_argument("--tool-call-parser", default=None,
                   help="read OpenAI tool calls from chat outputs in this format: hermes "
                   "(Qwen2.5/Qwen3, NousHermes)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='serve tool_choice "auto" (the default with tools); needs '
                   "--tool-call-parser")
    p.add_argument("--reasoning-parser", default=None, choices=["qwen3", "deepseek_r1"],
                   help="put a chat output's <think>...</think> in reasoning_content")
    add_role_args(p)
    engine_args(p)
    p.set_defaults(fn=cmd_serve)

    add_route_parser(sub)
    add_eldr_parser(sub)

    add_sim_parser(sub)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"moebius: error: {e}")
    logging.getLogger("moebius").debug("done in %.1f s", time.perf_counter() - t0)


if __name__ == "__main__":
    main()
