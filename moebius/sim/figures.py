"""The step times we measured on H200, as data: the targets of the fit (calibrate) and of the
check (validate). Each row names where the figure is written down.

- DESIGN.md, "Measured on 2×H200": a lean probe of Qwen3-30B-A3B decode steps (random bf16,
  CUDA graph, grouped_mm experts, SDPA over contiguous KV of 512 tokens, NCCL; 12 layers timed
  and scaled to 48, so it has no per-step host time; source "probe").
- BENCHMARKS.md, "Session 3" (results/decode_h200_session3_final.json, and its
  DeepSeek-V2-Lite rows, results/decode_h200_session3_deepseek_v2_lite.json): the current
  engine (fused Triton kernels, PDL), one H200, 128-token prompts, median decode step through
  ``engine.step()``, split into the graph's GPU time and the host's (source "engine").
- BENCHMARKS.md, "Session 2 final" (results/decode_h200_session2_final.json,
  results/decode_h200_deepseek_v2_lite.json): the engine one session earlier, measured the same
  way (``ENGINE_S2``, source "engine" too but not in ``ALL``: refit.py fits it alone, to show
  how the engine terms moved).
- BENCHMARKS.md, "With CUDA graphs and the Triton paged decode kernel": the session-1 engine,
  measured the same way (source "engine-s1"). It still fits the probe-side constants (the EP and
  collective ones with them), which the current engine's one-GPU rows cannot.
- BENCHMARKS.md, "Decode step time, single GPU": the session-1 engine before graphs, eager
  (source "eager").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    source: str  # "probe" (DESIGN.md), "engine", "engine-s1" or "eager" (BENCHMARKS.md)
    ranks: int
    layout: str
    batch: int
    context: int  # tokens each sequence attends to
    step_ms: float
    host_ms: float | None = None  # the host's share, where measured
    model: str = "qwen3-30b-a3b"  # the preset whose shapes were measured


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
_ENGINE_S1 = {  # batch: (ms/step, host ms)
    1: (12.91, 0.22),
    8: (20.85, 0.31),
    16: (26.16, 0.40),
    32: (31.83, 0.74),
    64: (34.95, 1.18),
    128: (37.57, 2.37),
    256: (43.46, 5.08),
}

# the engine, batch: (ms/step, host ms), by preset and the results file they come from
_SESSION_3 = {
    ("qwen3-30b-a3b", "results/decode_h200_session3_final.json"): {
        1: (3.383, 0.337),
        4: (6.038, 0.487),
        8: (8.480, 0.498),
        16: (12.149, 0.710),
        32: (15.970, 1.402),
        64: (18.166, 1.731),
        128: (21.412, 3.845),
        256: (27.521, 7.713),
    },
    ("deepseek-v2-lite", "results/decode_h200_session3_deepseek_v2_lite.json"): {
        1: (5.077, 0.486),
        16: (10.355, 0.577),
        64: (12.573, 1.187),
        256: (20.317, 6.385),
    },
}
_SESSION_2 = {
    ("qwen3-30b-a3b", "results/decode_h200_session2_final.json"): {
        1: (4.483, 0.462),
        4: (7.188, 0.683),
        8: (9.981, 1.012),
        16: (13.053, 0.695),
        32: (16.135, 0.794),
        64: (18.347, 1.114),
        128: (20.949, 2.616),
        256: (24.897, 4.458),
    },
    ("deepseek-v2-lite", "results/decode_h200_deepseek_v2_lite.json"): {
        1: (5.326, 0.270),
        16: (11.238, 0.742),
        64: (14.058, 1.958),
        256: (21.775, 7.253),
    },
}
# decode results of the same sessions that are not the default engine's final figures
OTHER_FILES = {
    "results/decode_h200_session3_pdl_off.json": "the final call with MOEBIUS_PDL=0 (A/B)",
    "results/decode_h200_session3_call2_pdl_on.json": "an earlier call of session 3 (A/B)",
    "results/decode_h200_session3_call2_pdl_off.json": "an earlier call of session 3 (A/B)",
    # session 5: overlapped scheduling hides the host (a step is max(gpu, host), not the sum
    # the cost model prices); the synchronous rows repeat session 3's within noise
    "results/decode_h200_session5_async_off.json": "session 5, synchronous (A/B)",
    "results/decode_h200_session5_async_on.json": "session 5, overlapped steps (A/B)",
    "results/decode_h200_session5_call1_async_off.json": "session 5, an earlier call (A/B)",
}


def _engine_rows(session: dict) -> dict[str, list[Figure]]:
    """Results file -> its rows, as figures."""
    return {
        path: [
            Figure("engine", 1, "tp", b, ENGINE_CONTEXT, t, h, model) for b, (t, h) in ms.items()
        ]
        for (model, path), ms in session.items()
    }


PROBE: list[Figure] = [Figure("probe", 1, "tp", b, PROBE_CONTEXT, t) for b, t in _PROBE_1.items()]
PROBE += [Figure("probe", 2, "tp", b, PROBE_CONTEXT, t[0]) for b, t in _PROBE_2.items()]
PROBE += [Figure("probe", 2, "ep", b, PROBE_CONTEXT, t[1]) for b, t in _PROBE_2.items()]
ENGINE_FILES = {**_engine_rows(_SESSION_3), **_engine_rows(_SESSION_2)}  # file -> its rows
ENGINE: list[Figure] = [f for key in _SESSION_3 for f in ENGINE_FILES[key[1]]]
ENGINE_S2: list[Figure] = [f for key in _SESSION_2 for f in ENGINE_FILES[key[1]]]
ENGINE_S1: list[Figure] = [
    Figure("engine-s1", 1, "tp", b, ENGINE_CONTEXT, t, h) for b, (t, h) in _ENGINE_S1.items()
]
EAGER: list[Figure] = [Figure("eager", 1, "tp", b, ENGINE_CONTEXT, t) for b, t in _EAGER_1.items()]
ALL = PROBE + ENGINE + ENGINE_S1 + EAGER

# The engine on 2×H200 (session 4, BENCHMARKS.md "Two GPUs"): both layouts graphed, EP by
# all-gather + reduce-scatter, context ~141. Held out: no fit uses them yet (validate prints
# them apart). Qwen b2048 from the call-3 file, where graphs reached 2048 (the call-2 TP b2048
# ran eagerly); DeepSeek TP past 1024 ran eagerly and is left out.
_TWO_GPU = {
    ("qwen3-30b-a3b", "results/multirank_h200x2_qwen_allgather_call2.json"): {
        ("tp", 1): 5.37, ("tp", 4): 7.04, ("tp", 16): 10.70, ("tp", 64): 14.71,
        ("tp", 256): 22.19, ("tp", 1024): 64.39,
        ("ep", 1): 6.86, ("ep", 4): 8.16, ("ep", 16): 12.05, ("ep", 64): 16.29,
        ("ep", 256): 23.65, ("ep", 1024): 70.01,
    },
    ("qwen3-30b-a3b", "results/multirank_h200x2_qwen_switch_call3.json"): {
        ("tp", 2048): 103.07, ("ep", 2048): 107.61,
    },
    ("deepseek-v2-lite", "results/multirank_h200x2_deepseek_call2_partial.jsonl"): {
        ("tp", 1): 5.93, ("tp", 16): 9.54, ("tp", 64): 12.10, ("tp", 256): 18.66,
        ("tp", 1024): 56.77,
        ("ep", 1): 7.29, ("ep", 16): 10.53, ("ep", 64): 12.56, ("ep", 256): 17.11,
        ("ep", 1024): 53.25,
    },
}
ENGINE_2GPU: list[Figure] = [
    Figure("engine", 2, layout, b, ENGINE_CONTEXT, ms, None, model)
    for (model, _path), rows in _TWO_GPU.items()
    for (layout, b), ms in rows.items()
]
# An empty switch of Qwen3-30B-A3B on 2×H200, expert weights only (NCCL point-to-point), s
SWITCH_2GPU_WEIGHTS_S = {"tp->ep": 0.0558, "ep->tp": 0.0558}

# Link figures (DESIGN.md): NCCL send/recv at 1 GiB 360 GB/s; all-gather 275 GB/s at 1 GiB,
# 230-264 at 64 MB; all_reduce of 64 KB 22 µs (eager, host-timed); peer copy 396 GB/s.
NCCL_SENDRECV_BPS = 360e9
NCCL_ALLGATHER_BPS = 275e9
NCCL_ALLREDUCE_64K_S = 22e-6
PEER_COPY_BPS = 396e9
HBM_COPY_BPS = 4.28e12  # read + write counted
