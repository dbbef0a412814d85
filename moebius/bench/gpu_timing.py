"""GPU-side timing of a rank's decode graph, run inside the rank's process through
``engine.executor.call("moebius.bench.gpu_timing:<function>", ...)`` (every rank at once, so
the collectives captured in the graph match).

``graph_replay_seconds`` is the step's GPU time without the host (inputs, sampling, pipes);
``graph_kernel_table`` is where that time goes, kernel by kernel (torch.profiler);
``profile_start`` / ``profile_stop`` give the same table for whatever the rank runs between
them (an eager prefill step).
"""

from __future__ import annotations

import torch


def _graph(runner, batch: int):
    """The graph a decode step of ``batch`` sequences replays (EP: a rank's even share)."""
    graphs, layout = runner.graphs, runner.layout
    n = batch if layout.is_tp else -(-batch // runner.comm.world_size)
    bucket = graphs.bucket(layout, n) if graphs is not None else 0
    return graphs.graphs[(layout.mode, bucket)][0] if bucket else None


def graph_replay_seconds(runner, batch: int, reps: int = 20) -> float | None:
    """Median GPU time of one replay of the decode graph ``batch`` runs in (None: no graph)."""
    graph = _graph(runner, batch)
    if graph is None:
        return None
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[reps // 2]


def graph_kernel_table(runner, batch: int, reps: int = 5, top: int = 15) -> list[dict] | None:
    """The ``top`` kernels by GPU time in one replay (mean over ``reps``): name, launches a
    replay, µs a replay."""
    from torch.profiler import ProfilerActivity, profile

    graph = _graph(runner, batch)
    if graph is None:
        return None
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            graph.replay()
        torch.cuda.synchronize()
    return _kernel_rows(prof, reps, top)


def _kernel_rows(prof, reps: int, top: int) -> list[dict]:
    rows = {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        r = rows.setdefault(ev.name[:90], [0, 0.0])
        r[0] += 1
        r[1] += ev.time_range.elapsed_us()
    out = [{"kernel": k, "launches": n / reps, "us": us / reps} for k, (n, us) in rows.items()]
    return sorted(out, key=lambda r: -r["us"])[:top]


_profiler = None  # the rank's profiler between profile_start and profile_stop


def profile_start(runner) -> None:
    """Start recording the rank's CUDA kernels (``profile_stop`` ends it)."""
    from torch.profiler import ProfilerActivity, profile

    global _profiler
    torch.cuda.synchronize()
    _profiler = profile(activities=[ProfilerActivity.CUDA])
    _profiler.__enter__()


def profile_stop(runner, top: int = 15) -> list[dict]:
    """The ``top`` kernels by GPU time since ``profile_start``: name, launches, µs."""
    global _profiler
    torch.cuda.synchronize()
    prof, _profiler = _profiler, None
    prof.__exit__(None, None, None)
    return _kernel_rows(prof, 1, top)


def print_kernel_table(table: list[dict] | None, title: str) -> None:
    """``graph_kernel_table``'s rows, one line each, under ``title``."""
    print(title)
    for k in table or []:
        print(f"  {k['us']:8.1f} us {k['launches']:6.0f}x  {k['kernel']}")
