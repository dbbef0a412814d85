"""Workers: one per rank. ``LocalExecutor`` runs the single rank in-process; ``ProcessExecutor``
spawns one process per rank (torch.distributed: NCCL on GPU, gloo on CPU), sends each its
messages over a pipe and gathers the replies. A worker that dies or raises stops the engine
with a clear error instead of a hang.

Under torchrun (one host or many) ``engine/torchrun.py`` replaces the pipes with a gloo control
group; both paths run messages through the same ``serve``.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import socket
import sys
import traceback

from moebius.config import EngineConfig
from moebius.engine.gc_tuning import tune_gc
from moebius.engine.messages import StepInput, StepResult, SwitchInput, SwitchResult


class WorkerError(RuntimeError):
    """A worker process failed or died; the engine cannot continue."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_runner(cfg: EngineConfig, rank: int, world_size: int):
    """Set up torch.distributed (when world_size > 1) and this rank's model runner."""
    import torch
    import torch.distributed as dist

    from moebius.engine.model_runner import ModelRunner
    from moebius.engine.sizing import kv_blocks_for_rank
    from moebius.parallel.comm import Comm

    tune_gc()  # every rank's process, however it was started
    torch.manual_seed(cfg.seed)
    if cfg.device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    comm = Comm()
    if world_size > 1:
        if not dist.is_initialized():
            backend = cfg.dist_backend or ("nccl" if cfg.device == "cuda" else "gloo")
            dist.init_process_group(backend, rank=rank, world_size=world_size)
        comm = Comm(rank, world_size, dist.group.WORLD, ep_exchange=cfg.ep_exchange)
        comm.warm_p2p()
    runner = ModelRunner(cfg, comm, num_kv_blocks_ep=0)
    runner.allocate_kv(kv_blocks_for_rank(cfg, runner))
    return runner


def serve(runner, kind: str, payload):
    """Run one engine message on this rank's runner."""
    if kind == "step":
        return runner.execute(payload)
    if kind == "launch":  # overlapped steps: no reply; "finish" answers for the oldest launch
        runner.inflight.append(runner.launch(payload))
        return None
    if kind == "finish":
        return runner.finish(runner.inflight.popleft())
    if kind == "masks":  # the newest launch's guided masks (a LateStep): sample it; no reply
        runner.inflight[-1] = runner.sample_late(runner.inflight[-1], payload)
        return None
    if kind == "switch":
        return runner.reshard(payload)
    if kind == "memory":
        return runner.memory_report()
    if kind == "call":  # a runner method, or "module:function" called as function(runner, ...)
        name, args = payload
        if ":" in name:
            import importlib

            module, fn = name.split(":")
            return getattr(importlib.import_module(module), fn)(runner, *args)
        return getattr(runner, name)(*args)
    raise ValueError(f"unknown message {kind!r}")


def worker_loop(cfg: EngineConfig, rank: int, world_size: int, conn) -> None:
    """Serve messages from a pipe until ("shutdown", None)."""
    try:
        runner = build_runner(cfg, rank, world_size)
        conn.send(("ready", runner.memory_report()))
        while True:
            kind, payload = conn.recv()
            if kind == "shutdown":
                break
            out = serve(runner, kind, payload)
            if kind not in ("launch", "masks"):
                conn.send(("ok", out))
    except (EOFError, KeyboardInterrupt):
        pass
    except BaseException:
        try:
            conn.send(("error", f"rank {rank}: {traceback.format_exc()}"))
        except (BrokenPipeError, OSError):
            pass
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class LocalExecutor:
    """The single rank in this process."""

    def __init__(self, cfg: EngineConfig) -> None:
        self.runner = build_runner(cfg, 0, 1)
        self.reports = [self.runner.memory_report()]

    def step(self, inputs: list[StepInput]) -> list[StepResult]:
        return [self.runner.execute(inputs[0])]

    def launch(self, inputs: list[StepInput]):
        """Queue a step on the device; ``finish`` waits for its tokens (overlapped steps)."""
        return self.runner.launch(inputs[0])

    def finish(self, pending) -> list[StepResult]:
        return [self.runner.finish(pending)]

    def masks(self, pending, masks: dict[str, bytes]):
        """The launched step's guided masks (it waits for them: a ``LateStep``): sample it."""
        return self.runner.sample_late(pending, masks)

    def switch(self, switch: SwitchInput) -> list[SwitchResult]:
        return [self.runner.reshard(switch)]

    def call(self, name: str, *args) -> list:
        return [serve(self.runner, "call", (name, args))]

    def shutdown(self) -> None:
        """Drop the weights, KV pool and graphs; on GPU hand their memory back to the driver, so
        an engine started next in this process (or another process) can size its KV pool."""
        if self.runner is None:
            return
        cuda = self.runner.device.type == "cuda"
        self.runner = None
        if cuda:
            import gc

            import torch

            gc.collect()
            torch.cuda.empty_cache()


@contextlib.contextmanager
def _main_module_hidden():
    """Spawned workers need nothing from the user's script: hide it from multiprocessing so a
    script without an ``if __name__ == "__main__"`` guard is not re-run in every worker."""
    main = sys.modules.get("__main__")
    saved = {k: getattr(main, k) for k in ("__file__", "__spec__") if hasattr(main, k)}
    for k in saved:
        delattr(main, k)
    main.__spec__ = None
    try:
        yield
    finally:
        if "__spec__" not in saved:
            del main.__spec__
        for k, v in saved.items():
            setattr(main, k, v)


def _process_main(cfg, rank, world_size, conn, env):
    os.environ.update(env)
    worker_loop(cfg, rank, world_size, conn)


class ProcessExecutor:
    """One spawned process per rank, driven by method name over pipes."""

    def __init__(self, cfg: EngineConfig) -> None:
        ctx = mp.get_context("spawn")
        port = cfg.master_port or free_port()
        self.procs = []
        self.conns = []
        for rank in range(cfg.ranks):
            parent, child = ctx.Pipe()
            env = {
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            }
            p = ctx.Process(
                target=_process_main,
                args=(cfg, rank, cfg.ranks, child, env),
                daemon=True,
                name=f"moebius-rank{rank}",
            )
            with _main_module_hidden():
                p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        self.reports = self._gather()

    def _gather(self) -> list:
        out = [None] * len(self.conns)
        pending = set(range(len(self.conns)))
        while pending:
            ready = mp.connection.wait(
                [self.conns[i] for i in pending] + [self.procs[i].sentinel for i in pending],
                timeout=600,
            )
            if not ready:
                self.shutdown()
                raise WorkerError("workers did not answer within 600 s")
            for i in list(pending):
                if self.conns[i] in ready or self.conns[i].poll():
                    try:
                        kind, payload = self.conns[i].recv()
                    except (EOFError, OSError):
                        code = self.procs[i].exitcode
                        kind, payload = "error", f"rank {i} died (exit code {code})"
                    if kind == "error":
                        self.shutdown()
                        raise WorkerError(payload)
                    out[i] = payload
                    pending.discard(i)
                elif self.procs[i].sentinel in ready:
                    code = self.procs[i].exitcode
                    self.shutdown()
                    raise WorkerError(f"rank {i} died (exit code {code})")
        return out

    def _send(self, kind: str, payloads: list) -> None:
        if not self.procs:
            raise WorkerError("the engine's workers are stopped (an earlier failure or shutdown)")
        for conn, payload in zip(self.conns, payloads, strict=True):
            try:
                conn.send((kind, payload))
            except (BrokenPipeError, OSError) as e:
                self.shutdown()
                raise WorkerError(f"a worker is gone: {e}") from e

    def _broadcast(self, kind: str, payloads: list) -> list:
        self._send(kind, payloads)
        return self._gather()

    def launch(self, inputs: list[StepInput]) -> None:
        """Queue a step on every rank without waiting (overlapped steps); each rank launches
        it and keeps it; ``finish`` answers for the oldest launch (pipes keep the order)."""
        self._send("launch", inputs)

    def finish(self, pending=None) -> list[StepResult]:
        return self._broadcast("finish", [None] * len(self.conns))

    def masks(self, pending, masks: dict[str, bytes]) -> None:
        """The newest launch's guided masks, to every rank (each samples its rows); no reply,
        the pipes keep them before the next launch."""
        self._send("masks", [masks] * len(self.conns))

    def step(self, inputs: list[StepInput]) -> list[StepResult]:
        return self._broadcast("step", inputs)

    def switch(self, switch: SwitchInput) -> list[SwitchResult]:
        return self._broadcast("switch", [switch] * len(self.conns))

    def call(self, name: str, *args) -> list:
        return self._broadcast("call", [(name, args)] * len(self.conns))

    def shutdown(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("shutdown", None))
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        self.conns = []
        self.procs = []


def make_executor(cfg: EngineConfig):
    from moebius.engine import torchrun

    if torchrun.launched():
        return torchrun.TorchrunExecutor(cfg)
    return LocalExecutor(cfg) if cfg.ranks == 1 else ProcessExecutor(cfg)
