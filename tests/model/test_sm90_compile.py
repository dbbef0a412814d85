"""The batch-1 kernels compiled for Hopper (sm_90) on this machine, with no GPU: none spills,
and the shared-memory GEMV's programs take what its plan counts (scripts/sm90_resources.py).
GPU time is scarce; this is what the CPU suite can still pin of kernels that only run there."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
gluon_gemv = pytest.importorskip("moebius.model.gluon_gemv")

H100_SMS, H100_SHARED = 132, 232448  # multiprocessors; shared memory a program may opt into


@pytest.fixture(scope="module")
def sm90():
    path = Path(__file__).resolve().parents[2] / "scripts" / "sm90_resources.py"
    spec = importlib.util.spec_from_file_location("sm90_resources", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_batch1_kernels_do_not_spill(sm90):
    for name in sm90.KERNELS:
        r = sm90.resources(name)
        assert r["local"] == 0 and r["stack"] == 0, (name, r)
        assert r["registers"] <= 255, (name, r)


@pytest.mark.parametrize("n,k,rows,programs", [(5120, 2048, 40, 128), (2048, 4096, 16, 128),
                                               (2560, 2048, 24, 107)])
def test_shared_memory_gemv_plan(n, k, rows, programs):
    """Qwen3-30B-A3B's q/k/v and o on one GPU, and q/k/v of a TP2 rank: one wave of programs
    on 132 multiprocessors, ``ceil(n / 132)`` rows each rounded up to a whole box."""
    nr, got = gluon_gemv.plan(n, k, H100_SMS, H100_SHARED)
    assert (nr * gluon_gemv.BR, got) == (rows, programs)
    assert got <= H100_SMS and gluon_gemv.shared_bytes(nr, k) <= H100_SHARED
    assert gluon_gemv.plan(n, k, H100_SMS, H100_SHARED, 8) is not None  # 8 tokens' rows fit
    assert gluon_gemv.plan(n, 4 * k, H100_SMS, H100_SHARED) is None  # too wide: registers' GEMV


@pytest.mark.parametrize("name,nr,k,t", [("q/k/v GEMV, shared memory (40 x 2048)", 5, 2048, 1),
                                         ("o GEMV, shared memory (16 x 4096)", 2, 4096, 1),
                                         ("q/k/v GEMV, shared memory, 8 tokens", 5, 2048, 8)])
def test_shared_memory_gemv_takes_what_its_plan_counts(sm90, name, nr, k, t):
    shared = sm90.resources(name)["shared"]
    boxes = nr * gluon_gemv.BR * k * 2
    assert boxes + 2 * k * t <= shared <= gluon_gemv.shared_bytes(nr, k, t)
