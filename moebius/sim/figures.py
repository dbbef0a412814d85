"""The step times we measured on H200, as data: the targets of the fit (calibrate) and of the
check (validate). Each row names where the figure is written down.

- DESIGN.md, "Measured on 2×H200": a lean probe of Qwen3-30B-A3B decode steps (random bf16,
  CUDA graph, grouped_mm experts, SDPA over contiguous KV of 512 tokens, NCCL; 12 layers timed
  and scaled to 48, so it has no per-step host time).
- BENCHMARKS.md, "With CUDA graphs and the Triton paged decode kernel": the real engine, one
  H200, 128-token prompts, median decode step through ``engine.step()``, split into the graph's
  GPU time and the host's (source "engine").
- BENCHMARKS.md, "Decode step time, single GPU": the same engine before graphs, eager
  (source "eager").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    source: str  # "probe" (DESIGN.md) or "engine" (BENCHMARKS.md)
    ranks: int
    layout: str
    batch: int
    context: int  # tokens each sequence attends to
    step_ms: float
    host_ms: float | None = None  # the host's share, where measured


PROBE_CONTEXT = 512
ENGINE_CONTEXT = 128 + 3 + 10  # prompt + warm-up + half the timed steps

_PROBE_1 = {1: 7.8, 8: 15.4, 64: 28.5, 256: 33.3}
_PROBE_2 = {  # batch: (TP2, EP2)
    1: (7.7, 9.4),
    8: (12.0, 12.7),
    32: (18.1, 18.4),
    128: (21.2, 21.2),
    512: (30.7, 29.5),
    1024: (43.8, 43.8),
    2048: (68.9, 67.8),
}
_EAGER_1 = {1: 67.7, 16: 73.8, 64: 70.3, 256: 82.0}
_ENGINE_1 = {  # batch: (ms/step, host ms)
    1: (12.91, 0.22),
    8: (20.85, 0.31),
    16: (26.16, 0.40),
    32: (31.83, 0.74),
    64: (34.95, 1.18),
    128: (37.57, 2.37),
    256: (43.46, 5.08),
}

PROBE: list[Figure] = [Figure("probe", 1, "tp", b, PROBE_CONTEXT, t) for b, t in _PROBE_1.items()]
PROBE += [Figure("probe", 2, "tp", b, PROBE_CONTEXT, t[0]) for b, t in _PROBE_2.items()]
PROBE += [Figure("probe", 2, "ep", b, PROBE_CONTEXT, t[1]) for b, t in _PROBE_2.items()]
ENGINE: list[Figure] = [
    Figure("engine", 1, "tp", b, ENGINE_CONTEXT, t, h) for b, (t, h) in _ENGINE_1.items()
]
EAGER: list[Figure] = [Figure("eager", 1, "tp", b, ENGINE_CONTEXT, t) for b, t in _EAGER_1.items()]
ALL = PROBE + ENGINE + EAGER

# Link figures (DESIGN.md): NCCL send/recv at 1 GiB 360 GB/s; all-gather 275 GB/s at 1 GiB,
# 230-264 at 64 MB; all_reduce of 64 KB 22 µs (eager, host-timed); peer copy 396 GB/s.
NCCL_SENDRECV_BPS = 360e9
NCCL_ALLGATHER_BPS = 275e9
NCCL_ALLREDUCE_64K_S = 22e-6
PEER_COPY_BPS = 396e9
HBM_COPY_BPS = 4.28e12  # read + write counted
