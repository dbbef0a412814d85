"""Two CUDA ranks: the symmetric-memory one-shot all-reduce equals NCCL's exactly (bf16 and
fp32, many calls back to back, eager and inside one CUDA graph); messages it does not take
(too large, odd sizes, other dtypes) still reach NCCL through ``Comm.all_reduce``; gloo never
enables it."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moebius.engine.worker import free_port
from moebius.parallel.comm import Comm

two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"
)


def _check(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      MOEBIUS_SYMM_ALLREDUCE_MAX=str(64 << 10))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=2)
    try:
        comm = Comm(rank, 2, dist.group.WORLD)
        assert comm.enable_symm_allreduce()
        dev = torch.device("cuda", rank)
        g = torch.Generator(device=dev).manual_seed(rank)
        cases = [(2048, torch.bfloat16), (4 * 2048, torch.bfloat16), (8, torch.float32),
                 (16384, torch.float32), (64 << 10, torch.bfloat16),  # 128 KiB: NCCL
                 (7, torch.bfloat16), (100, torch.float16)]  # odd size, fp16: NCCL
        for n, dt in cases:
            for _ in range(10):
                x = torch.randn(n, generator=g, device=dev).to(dt)
                want = x.clone()
                dist.all_reduce(want)
                assert torch.equal(comm.all_reduce(x), want), (n, dt)
        # inside a graph: 40 all-reduces in a row, each of the previous one's output
        x = torch.randn(4096, generator=g, device=dev).to(torch.bfloat16) / 64
        x0 = x.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            comm.all_reduce(x.clone())
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=s):
                for _ in range(40):
                    comm.all_reduce(x)
                    x.mul_(0.5)
        torch.cuda.current_stream().wait_stream(s)
        for _ in range(3):
            x.copy_(x0)
            graph.replay()
            want = x0.clone()
            for _ in range(40):
                dist.all_reduce(want)
                want.mul_(0.5)
            assert torch.equal(x, want)
    finally:
        dist.destroy_process_group()


@two_gpus
def test_one_shot_all_reduce_equals_nccl():
    mp.spawn(_check, args=(free_port(),), nprocs=2)


def _gloo(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        comm = Comm(rank, 2, dist.group.WORLD)
        assert not comm.enable_symm_allreduce()
        x = torch.full((4,), float(rank + 1))
        assert torch.equal(comm.all_reduce(x), torch.full((4,), 3.0))
    finally:
        dist.destroy_process_group()


def test_gloo_keeps_its_own_all_reduce():
    mp.spawn(_gloo, args=(free_port(),), nprocs=2)
