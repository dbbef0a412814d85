"""Collectives over one process group, with a single-rank no-op form.

Layers call these explicitly in ``forward`` so every collective stays visible. gloo lacks a
reduce-scatter, so on CPU it is an all-reduce followed by taking the own chunk (same result).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch >= 2.13 renames all_gather_into_tensor; 2.11 (the GPU machines) has only the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class Comm:
    """The collectives a layer needs, bound to one process group."""

    def __init__(self, rank: int = 0, world_size: int = 1, group=None,
                 ep_exchange: str = "allgather") -> None:
        self.rank = rank
        self.world_size = world_size
        self.group = group
        self.backend = dist.get_backend(group) if world_size > 1 else "none"
        # how EP moves tokens to their experts' ranks: "allgather" (+ reduce-scatter, fixed
        # shapes) or "alltoall" (only the tokens a rank needs, sizes exchanged every layer)
        self.ep_exchange = ep_exchange

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over ranks, in place."""
        if self.world_size == 1:
            return x
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped ``x`` of every rank along dim 0."""
        if self.world_size == 1:
            return x
        out = torch.empty(
            (self.world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device
        )
        _all_gather_single(out, x.contiguous(), group=self.group)
        return out

    def all_gather_rows(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """``all_gather`` of several (T, ...) tensors in one collective: their rows travel as
        the bytes of one packed row (each part at an offset aligned to its element size)."""
        if self.world_size == 1:
            return parts
        T = parts[0].shape[0]
        cols, offsets, off = [], [], 0
        for t in parts:
            e = t.element_size()
            gap = -off % e
            if gap:
                cols.append(torch.zeros(T, gap, dtype=torch.uint8, device=t.device))
            off += gap
            offsets.append(off)
            b = t.contiguous().view(T, -1).view(torch.uint8)
            cols.append(b)
            off += b.shape[1]
        align = max(t.element_size() for t in parts)
        if off % align:
            cols.append(torch.zeros(T, align - off % align, dtype=torch.uint8,
                                    device=parts[0].device))
        rows = self.all_gather(torch.cat(cols, dim=1))
        out = []
        for t, o in zip(parts, offsets, strict=True):
            n = t[:1].numel() * t.element_size()
            out.append(rows[:, o : o + n].view(t.dtype).view(-1, *t.shape[1:]))
        return out

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over ranks and return this rank's 1/N chunk of dim 0."""
        if self.world_size == 1:
            return x
        chunk = x.shape[0] // self.world_size
        if self.backend == "gloo":
            dist.all_reduce(x, group=self.group)
            return x[self.rank * chunk : (self.rank + 1) * chunk]
        out = torch.empty((chunk, *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.reduce_scatter_tensor(out, x.contiguous(), group=self.group)
        return out

    def all_to_all(self, x: torch.Tensor, send_counts: list[int],
                   recv_counts: list[int]) -> torch.Tensor:
        """Rows ``x[sum(send_counts[:j]) : ...]`` go to rank j; returns the rows every rank
        sent here, concatenated in rank order (``recv_counts[j]`` from rank j)."""
        if self.world_size == 1:
            return x
        out = torch.empty((sum(recv_counts), *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=self.group)
        return out

    def all_gather_object(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)

    def p2p(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]):
        """Run a batch of point-to-point transfers and wait for all of them."""
        for work in self.p2p_start(sends, recvs):
            work.wait()

    def warm_p2p(self) -> None:
        """Exchange one element with every peer: NCCL opens its point-to-point connections on
        first use (~0.2 s on 2xH200), which would otherwise land on the first switch."""
        if self.world_size == 1:
            return
        dev = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else "cpu"
        peers = [r for r in range(self.world_size) if r != self.rank]
        out = [torch.zeros(1, device=dev) for _ in peers]
        sends = [(torch.ones(1, device=dev), r) for r in peers]
        self.p2p(sends, list(zip(out, peers, strict=True)))

    def p2p_start(self, sends: list[tuple[torch.Tensor, int]],
                  recvs: list[tuple[torch.Tensor, int]]) -> list:
        """Start a batch of point-to-point transfers; ``work.wait()`` on each (on GPU: makes the
        current stream wait) before reading what was received or reusing what was sent."""
        if not sends and not recvs:
            return []
        ops = [dist.P2POp(dist.isend, t, peer, group=self.group) for t, peer in sends]
        ops += [dist.P2POp(dist.irecv, t, peer, group=self.group) for t, peer in recvs]
        return dist.batch_isend_irecv(ops)
