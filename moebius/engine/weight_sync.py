"""Weights over a trainer's process group (RL with the trainer on its own GPUs: SGLang's
``init_weights_update_group`` / ``update_weights_from_distributed``, vLLM's RLHF example):
the trainer and every engine rank join one more group, apart from the engine's own (its own
TCP store: the trainer is rank 0, engine rank r is ``rank_offset + r``); an update names the
tensors (name, dtype, shape), every rank checks them, then the trainer broadcasts each one
and every rank writes what it holds of it in place (``WeightWriter``), never holding more
than one tensor in flight. NCCL on GPU, gloo on CPU.

Trainer side::

    sender = WeightSender("10.0.0.1", 29600, num_engine_ranks=2)    # with the engine's join
    sender.send(model.named_parameters())                           # with the engine's update

Engine side: ``LLM.join_weight_group(...)`` / ``LLM.update_weights(GroupSource(specs))``,
each concurrent with the trainer's call (they rendezvous). ``GroupSource.of(named)`` gives
the specs of the tensors the trainer is about to send.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0


def open_group(host: str, port: int, world_size: int, rank: int, backend: str,
               timeout_s: float = DEFAULT_TIMEOUT_S):
    """A process group of its own over a TCP store at host:port (rank 0 hosts the store)."""
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, rank == 0, timeout=timeout)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        if hasattr(opts, "_timeout"):  # (a private field, so checked)
            opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, opts)
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


@dataclass(frozen=True)
class GroupSource:
    """A weight update whose tensors come over the group: (Hugging Face name, dtype name,
    shape) each, in the order the trainer sends them."""

    specs: tuple[tuple[str, str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, named: Iterable[tuple[str, torch.Tensor]]) -> GroupSource:
        return cls(tuple((n, str(t.dtype).removeprefix("torch."), tuple(t.shape))
                         for n, t in named))

    def __len__(self) -> int:
        return len(self.specs)


class WeightSender:
    """The trainer's end: rank 0 of the group (it hosts the store)."""

    def __init__(self, host: str, port: int, num_engine_ranks: int, backend: str = "gloo",
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.group = open_group(host, port, 1 + num_engine_ranks, 0, backend, timeout_s)

    def send(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Broadcast each tensor, in order (the engine's update names the same ones)."""
        for _, t in named:
            self.group.broadcast(t.detach().contiguous(), 0).wait()


# ------------------------------------------------------------------ on an engine rank
def join(runner, host: str, port: int, world_size: int, rank_offset: int,
         timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Called on every rank (``executor.call``): join the trainer's group."""
    backend = "nccl" if runner.device.type == "cuda" else "gloo"
    runner.weight_group = open_group(host, port, world_size, rank_offset + runner.rank, backend,
                                     timeout_s)


def group_plan(writer, group, specs, device) -> list[tuple[str, object]]:
    """As ``loader.update_plan`` for a ``GroupSource``: every name and shape checked first,
    then each tensor received in order (the rank takes part in every broadcast, also of
    tensors it holds no part of) and handed to the writer."""
    if group is None:
        raise ValueError("no weight group: join_weight_group first")
    for name, _, shape in specs:
        writer.check(name, shape)

    def receive(dtype: str, shape: tuple):
        buf = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        group.broadcast(buf, 0).wait()
        return buf

    return [(name, lambda d=dtype, s=shape: receive(d, s)) for name, dtype, shape in specs]
