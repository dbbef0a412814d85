"""The (token, piece) pairs of a prefill sorted by piece for the grouped GEMMs, in Triton:
a stable counting sort in three launches, with the inverse permutation and the groups' ends.

``torch.argsort`` (8 radix passes), a zeroed ``scatter_add_`` count, a ``cumsum`` and an
``index_copy_`` for the inverse cost 2.3-2.4 ms of a 1 × 2048 or 16 × 512 prefill step on H100
in the radix passes alone (48 layers; BENCHMARKS.md, session 11). Here:

1. ``_count_kernel``: per chunk of CH pairs, a histogram over the pieces.
2. ``_offsets_kernel`` (one program, a block of chunks at a time): each (chunk, piece)'s first
   slot, from exclusive sums of the counts over pieces and over chunks; the groups' inclusive
   ends for ``_grouped_mm``.
3. ``_scatter_kernel``: per chunk, its pairs sorted by (piece, index) (``tl.sort``), each
   stored at its piece's first slot for the chunk plus its rank there.

Chunks in order and indices in order within a chunk make it stable: ``order`` is
``torch.argsort(pieces, stable=True)``, bit for bit. Pieces not held here come as P and sort
last, as in the caller.

Shape legend: M pairs, P pieces, CH pairs a chunk, NC chunks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CH = 1024


@triton.jit
def _count_kernel(ids, counts, M, CH: tl.constexpr, P_PAD: tl.constexpr):
    c = tl.program_id(0)
    g = c * CH + tl.arange(0, CH)
    e = tl.load(ids + g, mask=g < M, other=P_PAD - 1).to(tl.int32)  # bin P_PAD - 1: padding
    tl.store(counts + c * P_PAD + tl.arange(0, P_PAD), tl.histogram(e, P_PAD))


@triton.jit
def _offsets_kernel(counts, base, ends, NC, P, ROWS: tl.constexpr, P_PAD: tl.constexpr):
    bins = tl.arange(0, P_PAD)
    totals = tl.zeros([P_PAD], tl.int32)
    for r0 in range(0, NC, ROWS):  # ROWS chunks at a time: any number of chunks fits
        rows = r0 + tl.arange(0, ROWS)
        totals += tl.sum(tl.load(counts + rows[:, None] * P_PAD + bins[None, :],
                                 mask=(rows < NC)[:, None], other=0), 0)
    tl.store(ends + bins, tl.cumsum(totals, 0), mask=bins < P)
    seen = tl.cumsum(totals, 0) - totals  # a piece's first slot, then past earlier chunks
    for r0 in range(0, NC, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        rmask = (rows < NC)[:, None]
        n = tl.load(counts + rows[:, None] * P_PAD + bins[None, :], mask=rmask, other=0)
        before = tl.cumsum(n, 0) - n  # its pairs in earlier chunks of this block
        within = tl.cumsum(n, 1) - n  # the chunk's pairs of lower pieces
        tl.store(base + rows[:, None] * P_PAD + bins[None, :], seen[None, :] + before - within,
                 mask=rmask)
        seen += tl.sum(n, 0)


@triton.jit
def _scatter_kernel(ids, base, order, inv, M, CH: tl.constexpr, P_PAD: tl.constexpr):
    c = tl.program_id(0)
    i = tl.arange(0, CH)
    g = c * CH + i
    e = tl.load(ids + g, mask=g < M, other=P_PAD - 1).to(tl.int32)
    s = tl.sort(e * CH + i)  # by piece, then index
    e_s = s // CH
    pair = c * CH + s % CH
    keep = e_s < P_PAD - 1
    slot = tl.load(base + c * P_PAD + e_s, mask=keep, other=0) + i
    tl.store(order + slot, pair.to(tl.int64), mask=keep)
    tl.store(inv + pair, slot.to(tl.int64), mask=keep)


def sort_pairs(pieces: torch.Tensor, P: int):
    """pieces (M,) int in [0, P]: (order (M,) long with ``pieces[order]`` non-decreasing,
    stably; inv (M,) long, its inverse; ends (P,) int32, each piece's inclusive end in
    ``order``, as ``torch._grouped_mm``'s offsets)."""
    M = pieces.numel()
    dev = pieces.device
    nc = max(1, triton.cdiv(M, CH))
    p_pad = triton.next_power_of_2(P + 2)
    counts = torch.empty(nc, p_pad, dtype=torch.int32, device=dev)
    base = torch.empty_like(counts)
    order = torch.empty(M, dtype=torch.long, device=dev)
    inv = torch.empty_like(order)
    ends = torch.empty(P, dtype=torch.int32, device=dev)
    _count_kernel[(nc,)](pieces, counts, M, CH=CH, P_PAD=p_pad, num_warps=4)
    _offsets_kernel[(1,)](counts, base, ends, nc, P, ROWS=max(1, min(64, 4096 // p_pad)),
                          P_PAD=p_pad, num_warps=8)
    _scatter_kernel[(nc,)](pieces, base, order, inv, M, CH=CH, P_PAD=p_pad, num_warps=4)
    return order, inv, ends
