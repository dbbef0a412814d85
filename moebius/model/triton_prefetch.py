"""Asking L2 for weights a later kernel of the step will read (Hopper's bulk prefetch).

At batch 1 a decode layer streams ~114 MB of weights (Qwen3-30B-A3B) through a chain of
kernels, several of which move almost no bytes (norms, q/k, attention, the experts' routing):
while they run, DRAM idles, and each weight kernel then pays its own ramp. Here a running
kernel hands the memory system a later kernel's weights with ``cp.async.bulk.prefetch.L2``:
one instruction per chunk, no registers, no shared memory and nothing to wait for, so it
costs the issuing kernel next to nothing; the later kernel then reads them from L2. Uses
(each behind its own switch, off until a GPU run has timed it, docs/decisions.md):
- the gate/up kernel of one token, once it has picked its experts, asks for their down
  weights (``MOEBIUS_PREFETCH_DOWN``): the 25 MB the down kernel reads stream together with
  gate/up's 50 MB instead of after them;
- the decode attention kernel asks for the o projection (``MOEBIUS_PREFETCH_O``);
- the down kernel of one token asks for the next layer's q/k/v (``MOEBIUS_PREFETCH_QKV``).
The streaming loads around them are marked evict-first, so that a prefetched line is not
pushed out by the weights streamed past it. (Session 3's prefetches held registers and kept
the next launch back until after the wait, and lost; triton_pdl.py.)

Compute capability 9+ only (``usable``); elsewhere nothing is prefetched.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

CHUNK = 4096  # bytes a prefetch instruction asks for (written out in the asm below)


def _switch(name: str) -> bool:
    return os.environ.get(name, "0") == "1"


# MOEBIUS_PREFETCH_LAST=1: the prefetched lines marked evict-last (an L2 cache policy)
LAST = _switch("MOEBIUS_PREFETCH_LAST")
DOWN = _switch("MOEBIUS_PREFETCH_DOWN")
O_PROJ = _switch("MOEBIUS_PREFETCH_O")
QKV = _switch("MOEBIUS_PREFETCH_QKV")


@functools.cache
def _hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def usable(t: torch.Tensor | None) -> bool:
    """Whether ``t`` (a weight) can be prefetched: contiguous, on a Hopper-class GPU, 16-byte
    aligned, a whole number of 16-byte pieces and at least one chunk long."""
    nbytes = 0 if t is None else t.numel() * t.element_size()
    return (t is not None and t.is_cuda and _hopper(t.device.index or 0) and t.is_contiguous()
            and t.data_ptr() % 16 == 0 and nbytes % 16 == 0 and nbytes >= CHUNK)


def chunks_per_program(nbytes: int, programs: int, warps: int) -> int:
    """The ``N`` constexpr of ``prefetch_share``: chunks each of ``programs`` programs of
    ``warps`` warps asks for, a power of two, at least one a thread (fewer would leave
    threads repeating others' prefetches)."""
    return max(32 * warps, triton.next_power_of_2(triton.cdiv(triton.cdiv(nbytes, CHUNK),
                                                              programs)))


def evict_last() -> bool:
    """The ``LAST`` constexpr of ``prefetch_share`` (read at launch, so tests may flip it)."""
    return LAST


@triton.jit
def prefetch_share(base, nbytes, part, parts, N: tl.constexpr, LAST: tl.constexpr = False):
    """Program ``part`` of ``parts`` asks L2 for its share of the ``nbytes`` bytes at ``base``
    (16-byte aligned, nbytes a multiple of 16 and at least CHUNK): chunks part, part + parts,
    ... (N of them at most), the last one ending at nbytes. LAST: marked evict-last."""
    idx = part + tl.arange(0, N) * parts
    n_chunks = tl.cdiv(nbytes, 4096)
    start = tl.minimum(idx.to(tl.int64) * 4096, nbytes.to(tl.int64) - 4096)
    addr = base.to(tl.pointer_type(tl.int8)).to(tl.int64) + start
    want = (idx < n_chunks).to(tl.int32)
    if LAST:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; .reg .b64 pol; setp.ne.b32 p, $2, 0; "
            "createpolicy.fractional.L2::evict_last.b64 pol, 1.0; "
            "@p cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], 4096, pol; "
            "mov.u32 $0, 0; }",
            "=r,l,r", [addr, want], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; "
            "@p cp.async.bulk.prefetch.L2.global [$1], 4096; mov.u32 $0, 0; }",
            "=r,l,r", [addr, want], dtype=tl.int32, is_pure=False, pack=1)
