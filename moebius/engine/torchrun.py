"""Running under torchrun, on one host or many: every process runs the user's same command.
Global rank 0 builds the engine and is also the rank-0 worker; every other rank, on reaching
the engine's constructor, serves the messages rank 0 broadcasts over a gloo control group
until shutdown, then exits. So an unchanged script (or ``moebius generate|serve``) runs as

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint HOST:PORT \\
        -m moebius.cli generate MODEL --ranks 16 --layout ep --prompt "Hello"
"""

from __future__ import annotations

import os
import sys
import traceback
from datetime import timedelta

import torch.distributed as dist

from moebius.config import EngineConfig
from moebius.engine.messages import StepInput, StepResult, SwitchInput, SwitchResult
from moebius.engine.worker import WorkerError, build_runner, serve


def launched() -> bool:
    """True when this process was started by torchrun (its environment variables are set)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def _setup(cfg: EngineConfig):
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != cfg.ranks:
        raise ValueError(f"torchrun started {world} processes but ranks={cfg.ranks}")
    if cfg.device == "cuda":
        import torch

        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    runner = build_runner(cfg, rank, world)
    ctrl = dist.new_group(backend="gloo", timeout=timedelta(minutes=30))
    return rank, world, runner, ctrl


def follow(cfg: EngineConfig) -> None:
    """A non-zero rank: serve broadcast messages until shutdown, then exit the process."""
    rank, _, runner, ctrl = _setup(cfg)
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=ctrl)
        kind, payloads = box[0]
        if kind == "shutdown":
            break
        try:
            reply = ("ok", serve(runner, kind, payloads[rank]))
        except Exception:
            reply = ("error", f"rank {rank}: {traceback.format_exc()}")
        dist.gather_object(reply, None, dst=0, group=ctrl)
    dist.destroy_process_group()
    sys.exit(0)


class TorchrunExecutor:
    """Rank 0's side: broadcast each message, run rank 0's share here, gather the replies."""

    def __init__(self, cfg: EngineConfig) -> None:
        if int(os.environ["RANK"]) != 0:
            follow(cfg)  # never returns
        self.rank, self.world, self.runner, self.ctrl = _setup(cfg)
        self.alive = True
        self.reports = self._broadcast("memory", [None] * self.world)

    def _broadcast(self, kind: str, payloads: list) -> list:
        if not self.alive:
            raise WorkerError("the engine was shut down after a worker failure")
        dist.broadcast_object_list([(kind, payloads)], src=0, group=self.ctrl)
        try:
            mine = ("ok", serve(self.runner, kind, payloads[0]))
        except Exception:
            mine = ("error", f"rank 0: {traceback.format_exc()}")
        replies: list = [None] * self.world
        dist.gather_object(mine, replies, dst=0, group=self.ctrl)
        errors = [payload for status, payload in replies if status == "error"]
        if errors:
            self.shutdown()
            raise WorkerError("\n".join(errors))
        return [payload for _, payload in replies]

    def step(self, inputs: list[StepInput]) -> list[StepResult]:
        return self._broadcast("step", inputs)

    def switch(self, switch: SwitchInput) -> list[SwitchResult]:
        return self._broadcast("switch", [switch] * self.world)

    def call(self, name: str, *args) -> list:
        return self._broadcast("call", [(name, args)] * self.world)

    def shutdown(self) -> None:
        if self.alive:
            self.alive = False
            dist.broadcast_object_list([("shutdown", None)], src=0, group=self.ctrl)
            dist.destroy_process_group()
