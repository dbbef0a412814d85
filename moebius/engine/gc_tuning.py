"""Python's garbage collector set for a serving loop.

A decode step at batch 256 allocates thousands of short-lived objects (sequence work items,
sampled tokens, outputs). With CPython's default first-generation threshold (700) the
collector runs several times a step and every tenth time walks older generations too: on the
host that was over half of the engine's own per-step time at batch 256 (4-5 ms → ~2 ms with a
higher threshold; BENCHMARKS.md). Nearly all of these objects die by reference counting, so
collecting less often frees the same memory later, not less of it.

``MOEBIUS_GC_GEN0`` sets the threshold (0 keeps Python's); the setting is process-wide.
"""

from __future__ import annotations

import gc
import os

GEN0 = int(os.environ.get("MOEBIUS_GC_GEN0", "50000"))


def tune_gc() -> None:
    """Raise the first-generation threshold to GEN0 (never lower it)."""
    if GEN0 <= 0:
        return
    gen0, gen1, gen2 = gc.get_threshold()
    if gen0 < GEN0:
        gc.set_threshold(GEN0, gen1, gen2)
