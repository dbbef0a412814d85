"""All-reduce latency on one host: NCCL against the symmetric-memory one-shot kernel
(parallel/symm_allreduce.py), eager and inside a CUDA graph, at decode-sized messages; and a
check that the one-shot results equal NCCL's over many back-to-back calls.

    python -m moebius.bench.allreduce --ranks 2 --out results/allreduce_h200x2.json

A graph holds ``--calls`` all-reduces back to back (as a decode step does, 2 a layer); the
table gives µs per call. The limit ``MOEBIUS_SYMM_ALLREDUCE_MAX`` should sit where the
one-shot kernel stops winning.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moebius.engine.worker import free_port
from moebius.parallel.symm_allreduce import SymmAllReduce


def _time_graph(fn, x, calls: int, reps: int) -> float:
    """µs per call of ``calls`` back-to-back ``fn(x)`` replayed as one graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(x)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            for _ in range(calls):
                fn(x)
    torch.cuda.current_stream().wait_stream(s)
    g.replay()
    torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (reps * calls) * 1e6


def _time_eager(fn, x, calls: int) -> float:
    for _ in range(5):
        fn(x)
    torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(x)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def _worker(rank: int, world: int, port: int, args, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    dev = torch.device("cuda", rank)
    group = dist.group.WORLD
    symm = SymmAllReduce(group, dev, max(args.sizes_kib) << 10)

    def nccl(x):
        dist.all_reduce(x)

    rows = []
    for kib in args.sizes_kib:
        n = (kib << 10) // 2
        # correctness: many calls in a row, different data each, one-shot == NCCL exactly
        gen = torch.Generator(device=dev).manual_seed(1000 + rank)
        bad = 0
        for _ in range(args.check_calls):
            a = torch.randn(n, generator=gen, device=dev).to(torch.bfloat16)
            b = a.clone()
            symm(a)
            nccl(b)
            bad += int((a != b).sum())
        x = torch.zeros(n, dtype=torch.bfloat16, device=dev)  # zeros: sums stay finite
        row = {
            "kib": kib,
            "mismatches": bad,
            "nccl_graph_us": _time_graph(nccl, x, args.calls, args.reps),
            "symm_graph_us": _time_graph(symm, x, args.calls, args.reps),
            "nccl_eager_us": _time_eager(nccl, x, args.calls * 4),
            "symm_eager_us": _time_eager(symm, x, args.calls * 4),
        }
        rows.append(row)
    if rank == 0:
        q.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--sizes-kib", type=int, nargs="+",
                    default=[4, 16, 64, 256, 512, 1024, 2048, 4096, 8192])
    ap.add_argument("--calls", type=int, default=96, help="all-reduces in one graph")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--check-calls", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, args.ranks, port, args, q))
             for r in range(args.ranks)]
    for p in procs:
        p.start()
    rows = q.get(timeout=600)
    for p in procs:
        p.join()
    print(f"all-reduce µs/call, bf16, {args.ranks} ranks ({torch.cuda.get_device_name(0)})")
    print("| KiB | NCCL graph | one-shot graph | NCCL eager | one-shot eager | mismatches |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['kib']} | {r['nccl_graph_us']:.1f} | {r['symm_graph_us']:.1f} | "
              f"{r['nccl_eager_us']:.1f} | {r['symm_eager_us']:.1f} | {r['mismatches']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"ranks": args.ranks, "device": torch.cuda.get_device_name(0),
                       "calls_per_graph": args.calls, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
