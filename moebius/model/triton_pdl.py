"""Programmatic dependent launch (Hopper and later) for the decode kernels.

A kernel launched with it may start while the kernel before it on the stream is finishing:
its programs become resident and block at ``griddepcontrol.wait`` until that kernel has
finished and its writes are visible. At batch 1 a layer is ~10 launches of a few µs each, so
the launch and ramp of each kernel is a large part of its time; PDL overlaps it with the
tail of the one before (CUDA graphs keep the programmatic edges). Measured on H200: -0.33 ms
of a 3.36 ms batch-1 step (BENCHMARKS.md). On by default where the GPU has it (compute
capability 9+); ``MOEBIUS_PDL=0`` turns it off.

Every kernel launched with ``launch_kw()`` takes a ``PDL`` constexpr and calls
``pdl_wait(PDL)`` before it touches memory the kernel just before it wrote, on every path (a
program that returned early without it would let a later kernel run before the one before
this one finished). The next kernel is let go only once every program here has passed its
wait, so before its own wait a kernel may read weights and what kernels two or more back
wrote (the experts' down kernel reads the alignment's block labels), and ``prefetch_l2``
lines it will read: weights then stream from HBM while the kernel before still runs.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

WANTED = os.environ.get("MOEBIUS_PDL", "1") != "0"


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait for the kernel before to finish, then let the next one launch (no-op when off)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs, PDL: tl.constexpr):
    """Ask L2 for the 128-byte lines at ``ptrs`` (a tensor of pointers); no registers, no
    wait. Only under PDL, where it overlaps the kernel before (not in the interpreter)."""
    if PDL:
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l", [ptrs],
                                  dtype=tl.int32, is_pure=False, pack=1)


@functools.cache
def _supported(device: int) -> bool:
    return torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9


def launch_kw() -> dict:
    """The launch options of a kernel that calls ``pdl_wait(PDL)`` first, on the current
    device (off on CPU tensors under Triton's interpreter and on GPUs before Hopper)."""
    on = WANTED and torch.cuda.is_available() and _supported(torch.cuda.current_device())
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}
