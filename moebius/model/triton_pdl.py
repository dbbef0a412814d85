"""Programmatic dependent launch (Hopper) for the decode kernels: ``MOEBIUS_PDL=1``.

A kernel launched with it may start while the kernel before it on the stream is finishing:
its programs become resident and block at ``griddepcontrol.wait`` until that kernel has
finished and its writes are visible. At batch 1 a layer is ~12 launches of a few µs each, so
the launch and ramp of each kernel is a large part of its time; PDL overlaps it with the
tail of the one before (CUDA graphs keep the programmatic edges).

Every kernel launched with ``launch_kw()`` must call ``pdl_wait()`` before it touches memory
another kernel wrote, and must reach it on every path (a program that returns early without
it would let a later kernel run before the one before this finished).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

ENABLED = os.environ.get("MOEBIUS_PDL", "0") == "1"
_ENABLED = tl.constexpr(ENABLED)


@triton.jit
def pdl_wait():
    """Let the next kernel launch, then wait for the one before to finish (no-op when off)."""
    if _ENABLED:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


def launch_kw() -> dict:
    """Extra launch options of a kernel that calls ``pdl_wait`` first."""
    return {"launch_pdl": True} if ENABLED else {}
