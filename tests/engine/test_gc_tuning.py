"""The engine's GC setting: raised, never lowered, off with 0."""

from __future__ import annotations

import gc

from moebius.engine import gc_tuning


def test_tune_gc_raises_the_first_generation_threshold_only():
    saved, saved_gen0 = gc.get_threshold(), gc_tuning.GEN0
    try:
        gc.set_threshold(700, 10, 10)
        gc_tuning.GEN0 = 50_000
        gc_tuning.tune_gc()
        assert gc.get_threshold() == (50_000, 10, 10)
        gc.set_threshold(100_000, 10, 10)
        gc_tuning.tune_gc()  # never lowers a higher setting
        assert gc.get_threshold()[0] == 100_000
        gc.set_threshold(700, 10, 10)
        gc_tuning.GEN0 = 0  # MOEBIUS_GC_GEN0=0: Python's own
        gc_tuning.tune_gc()
        assert gc.get_threshold() == (700, 10, 10)
    finally:
        gc.set_threshold(*saved)
        gc_tuning.GEN0 = saved_gen0
