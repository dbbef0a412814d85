"""The fused experts (triton_moe's gate/up and down kernels) at prefill sizes: above
``triton_moe.MAX_PAIRS`` up to ``moe.LARGE_FUSED_MAX_PAIRS`` (2,048 tokens of top-8).

Above ``triton_moe.MAX_PAIRS`` (token, piece) pairs the engine runs two ``torch._grouped_mm``
with a gather of the token rows into expert order before them (268 MB a layer at 16 × 512
prompt tokens) and a SiLU·up pass between them (moe.experts_grouped). triton_moe's kernels
need neither: the gate/up kernel reads each block's token rows through their indices and
applies SiLU·up in its epilogue, the down kernel writes each pair's row in place. What they
lack at these sizes is an alignment for many pairs and larger tiles:

1. ``triton_sort.sort_pairs``: the pairs by piece (a stable counting sort) and each piece's end.
2. ``_pad_kernel``: per block of BM rows, its piece and its pairs; each piece's pairs padded
   to whole blocks (the layout ``triton_moe._align_kernel`` makes for few pairs).
3. ``triton_moe._run`` with BM = 64 rows a block and (128, 64) tiles, 8 warps.

Against CUTLASS's grouped GEMM (session 12, one H100, Qwen3-30B-A3B prefill, ``python -m
moebius.bench.decode --batches --prefill 1x2048 16x512`` with MOEBIUS_MOE_LARGE=fused or
grouped): 1 x 2048 46.4 against 47.9 ms, 16 x 512 in one step 139.0 against 116.5 ms (our
gate/up 1.07 + down 0.86 ms a layer, ~320 TFLOP/s, against ~540; kernel tables with
``--prefill-kernel-tables 16x512``). The down kernel ran at half the gate/up kernel's rate;
with 256-column tiles (session 13) it takes 0.23 ms a layer at 1 x 2048 against gate/up's 0.32.

Shape legend: M pairs, P pieces, BM rows a block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moebius.model.triton_moe import _Plan, _run, env_ints
from moebius.model.triton_sort import sort_pairs

BM_LARGE = 64
# (BN, BK) of the gate/up kernel, of the down kernel. The down kernel's 256-column tiles:
# session 13, one H100, `python -m moebius.bench.moe_kernels --down-sweep 2048`: the experts of
# 2,048 tokens 0.796 -> 0.720 ms a layer (grouped GEMM 0.956) against 128 columns; in the
# engine's 1 x 2048 prefill the down kernel 13.68 -> 11.14 ms a step, the step 47.0 -> 44.5 ms
# (three runs each in alternation). MOEBIUS_MOE_TILES_LARGE="BN1,BK1,BN2,BK2" replaces them.
TILES_LARGE = env_ints("MOEBIUS_MOE_TILES_LARGE", "128,64,256,64")
WARPS_LARGE = 8


@triton.jit
def _pad_kernel(order, ends, sorted_rows, block_piece, M, P, P_PAD: tl.constexpr,
                BM: tl.constexpr):
    b = tl.program_id(0)
    bins = tl.arange(0, P_PAD)
    end = tl.load(ends + bins, mask=bins < P, other=0)
    prev = tl.load(ends + bins - 1, mask=(bins >= 1) & (bins < P), other=0)
    count = tl.where(bins < P, end - prev, 0)
    padded = (count + BM - 1) // BM * BM
    pend = tl.cumsum(padded, 0)
    total = tl.sum(padded, 0)
    first = b * BM
    piece = tl.sum(((pend <= first) & (bins < P)).to(tl.int32), 0)
    mine = bins == piece
    n = tl.sum(tl.where(mine, count, 0), 0)
    j = first - tl.sum(tl.where(mine, pend - padded, 0), 0) + tl.arange(0, BM)
    used = first < total
    src = tl.sum(tl.where(mine, end - count, 0), 0) + j
    rows = tl.load(order + src, mask=used & (j < n), other=M)
    tl.store(sorted_rows + first + tl.arange(0, BM), rows.to(tl.int32))
    tl.store(block_piece + b, tl.where(used, piece, -1))


def experts_fused_large(x, pieces, weights, w13, w2t, reduce: bool = True, bm: int = BM_LARGE,
                        tiles=TILES_LARGE, warps: int = WARPS_LARGE, launch=None):
    """As ``triton_moe.experts_fused`` for any number of pairs: (T, H) summed, or with
    ``reduce=False`` (every piece held) the (T, K, H) weighted rows. ``bm``, ``tiles``,
    ``warps`` and ``launch`` ((warps, stages) of each kernel, as ``triton_moe._run``) override
    the prefill tiles (tuning, tests)."""
    T, K = pieces.shape
    M, P = T * K, w13.shape[0]
    assert M > 0
    flat = torch.where(pieces >= 0, pieces, P).flatten()  # P: not held here, sorts last
    order, _, ends = sort_pairs(flat, P)
    plan = _Plan(M, P, x.device, bm)
    _pad_kernel[(plan.num_blocks,)](order, ends, plan.sorted_rows, plan.block_piece, M, P,
                                    P_PAD=triton.next_power_of_2(P), BM=bm, num_warps=4)
    return _run(x, plan, K, weights, w13, w2t, tiles, reduce,
                launch=launch or (warps, 4, warps, 4))
