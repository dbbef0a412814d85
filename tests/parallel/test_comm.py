"""Collectives over gloo (2 processes): the packed all-gather equals one all-gather per tensor
for mixed dtypes and row widths that need alignment padding; point-to-point warms up."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moebius.engine.worker import free_port
from moebius.parallel.comm import Comm


def _check(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        comm = Comm(rank, 2, dist.group.WORLD)
        comm.warm_p2p()
        g = torch.Generator().manual_seed(rank)
        shapes = [(64, 2, torch.float32), (66, 3, torch.bfloat16), (2048, 8, torch.bfloat16)]
        for H, K, dt in shapes:
            x = torch.randn(5, H, generator=g).to(dt)
            ids = torch.randint(0, 128, (5, K), generator=g)
            w = torch.rand(5, K, generator=g).to(dt)
            packed = comm.all_gather_rows([x, ids, w])
            for got, t in zip(packed, (x, ids, w), strict=True):
                want = comm.all_gather(t)
                assert got.dtype == want.dtype and torch.equal(got, want), (H, K, dt)
    finally:
        dist.destroy_process_group()


def test_all_gather_rows_matches_separate_gathers():
    mp.spawn(_check, args=(free_port(),), nprocs=2)
