"""Programmatic dependent launch (Hopper and later) for the decode kernels.

A kernel launched with it may start while the kernel before it on the stream is finishing:
its programs become resident and block at ``griddepcontrol.wait`` until that kernel has
finished and its writes are visible. At batch 1 a layer is ~10 launches of a few µs each, so
the launch and ramp of each kernel is a large part of its time; PDL overlaps it with the
tail of the one before (CUDA graphs keep the programmatic edges). Measured on H200: -0.33 ms
of a 3.36 ms batch-1 step (BENCHMARKS.md). On by default where the GPU has it (compute
capability 9+); ``MOEBIUS_PDL=0`` turns it off.

Every kernel launched with ``launch_kw()`` takes a ``PDL`` constexpr and calls
``pdl_wait(PDL)`` before it touches memory another kernel wrote, on every path (a program
that returned early without it would let a later kernel run before the one before this one
finished). Before the wait a kernel may read only what no kernel of the step writes: weights,
and the step's inputs the host copied in before its first kernel (positions, slots, block
tables, context lengths; the KV of earlier steps is also final then, the newest token's is
not). What sits after the wait is the critical path: reads moved before it (session 11, one
H100: the attention split's context length and first block ids, the merge's context length,
the q/k kernel's positions, slots and rotary rows, the norms' weights) took batch 1 from 3.12
to 3.05 ms. Such a kernel calls ``pdl_launch_next`` first so the next launch is not held back
by those reads. Holding a tile of keys and values in registers across the wait lost (3.25
ms: more registers, and the compiled code loaded the values only after the first dot).

Tried and dropped (H200, session 3): letting the next kernel go only after the wait, so that
it may read what kernels two back wrote, with weights prefetched into L2 before the wait (a
Triton GEMV for the projections, the experts' down kernel its tile): every batch size got
5-10% slower than the plain order (L2 prefetches evicted by the concurrent expert stream,
later launches); BENCHMARKS.md has the figures.
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
    """Let the next kernel launch, then wait for the one before to finish (no-op when off)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_launch_next(PDL: tl.constexpr):
    """Let the next kernel launch now, for a kernel that reads before its ``pdl_wait``: the
    next kernel's programs then become resident (and stream their weights) as early as they
    would without those reads."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@functools.cache
def _supported(device: int) -> bool:
    return torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9


def launch_kw() -> dict:
    """The launch options of a kernel that calls ``pdl_wait(PDL)`` first, on the current
    device (off on CPU tensors under Triton's interpreter and on GPUs before Hopper)."""
    on = WANTED and torch.cuda.is_available() and _supported(torch.cuda.current_device())
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


# MOEBIUS_SMEM_CARVEOUT=1: every compiled kernel of moebius.model asks the multiprocessor for
# its most shared memory (the rest stays L1). A multiprocessor changes its L1/shared split only
# when it is empty, so a kernel whose programs need more shared memory than the running kernel
# chose cannot become resident next to it under PDL (model/gluon_gemv.py holds 128-160 KB a
# program). Off by default until a GPU run has timed it.
SHARED_CARVEOUT = os.environ.get("MOEBIUS_SMEM_CARVEOUT", "0") == "1"
_CARVEOUT_ATTRIBUTE = 9  # CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT


def prefer_shared_memory() -> int:
    """Ask for the largest shared-memory carve-out on every kernel compiled so far from a
    Triton or Gluon function of ``moebius.model`` (before a CUDA graph is captured, whose
    nodes keep the attributes); returns how many kernels it set (0 when off)."""
    if not SHARED_CARVEOUT:
        return 0
    import ctypes
    import sys

    from triton.runtime.jit import JITFunction

    libcuda = ctypes.CDLL("libcuda.so.1")
    done = 0
    for name, module in list(sys.modules.items()):
        if not name.startswith("moebius.model."):
            continue
        for fn in vars(module).values():
            if not isinstance(fn, JITFunction):
                continue
            for kernels, *_ in fn.device_caches.values():
                for kernel in kernels.values():
                    kernel._init_handles()
                    err = libcuda.cuFuncSetAttribute(ctypes.c_void_p(kernel.function),
                                                     _CARVEOUT_ATTRIBUTE, 100)
                    assert err == 0, f"cuFuncSetAttribute: CUresult {err}"
                    done += 1
    return done
