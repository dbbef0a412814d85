"""Paged decode attention over MLA latents in Triton (DeepSeek-V2/V3, absorbed weights).

Each cached token is one latent [c (r values), k_pe (dr values)], read as the single key of
every query head, and c doubles as the value (model/mla.py). One program per (sequence, tile of
HT query heads, context split) reads the sequence's latents from the pool through its block
table, scores q_c·c + q_pe·k_pe, and accumulates softmax·c; triton_attention's merge kernel
combines the splits. r + dr = 576 is not a power of two, so the two parts are separate tiles.
Shapes are fixed by the batch: it runs inside CUDA graphs.

Shape legend: B sequences, nh query heads, r kv_lora_rank, dr rope dims, D = r + dr,
bs block size, S context splits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moebius.model.triton_attention import (
    first_blocks,
    merge_splits,
    num_splits,
    online_softmax,
    split_length,
    store_partial,
    tile_blocks,
)
from moebius.model.triton_pdl import launch_kw, pdl_wait

TILE = 32  # latents per inner iteration
HEAD_TILE = 16


@triton.jit
def _mla_split_kernel(
    Q,
    C,
    Mid,
    Lse,
    tables,
    ctx_lens,
    scale,
    NH,
    stride_qb,
    stride_qh,
    stride_cb,
    stride_cs,
    stride_bt,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_lb,
    stride_lh,
    R: tl.constexpr,
    DR: tl.constexpr,
    HT: tl.constexpr,
    BS: tl.constexpr,
    TILE_N: tl.constexpr,
    S: tl.constexpr,
    UNIT: tl.constexpr,
    IEEE: tl.constexpr,
    PDL: tl.constexpr,
):
    b = tl.program_id(0)
    heads = tl.program_id(1) * HT + tl.arange(0, HT)
    split = tl.program_id(2)
    hmask = heads < NH
    # Before the wait, as triton_attention's split kernel: the host's context length and the
    # first tile's block ids. Unlike it, no pdl_launch_next: with it the merge's programs sat
    # resident early and DeepSeek-V2-Lite batch 8 took 11.13 -> 13.80 ms (session 12, H100,
    # with the one-program-a-head merge); with merge_splits' 128-column programs it still
    # costs batch 1 4.88 -> 4.95 ms and batch 8 9.55 -> 9.67 (session 13, H100).
    ctx = tl.load(ctx_lens + b)
    split_len = split_length(ctx, S, UNIT)
    start = split * split_len
    end = tl.minimum(start + split_len, ctx)
    offs_r = tl.arange(0, R)
    offs_p = tl.arange(0, DR)
    offs_n = tl.arange(0, TILE_N)
    first = first_blocks(tables + b * stride_bt, start, end, offs_n, BS)
    pdl_wait(PDL)
    q_row = Q + b * stride_qb + heads[:, None] * stride_qh
    q_c = tl.load(q_row + offs_r[None, :], mask=hmask[:, None], other=0.0)
    q_p = tl.load(q_row + R + offs_p[None, :], mask=hmask[:, None], other=0.0)
    m = tl.full([HT], float("-inf"), tl.float32)
    l_sum = tl.zeros([HT], tl.float32)
    acc = tl.zeros([HT, R], tl.float32)
    for t0 in range(start, end, TILE_N):
        tok, tmask, blk = tile_blocks(tables + b * stride_bt, t0, start, end, first, offs_n, BS)
        row = C + blk[:, None] * stride_cb + (tok % BS)[:, None] * stride_cs
        c = tl.load(row + offs_r[None, :], mask=tmask[:, None], other=0.0)
        pe = tl.load(row + R + offs_p[None, :], mask=tmask[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q_c, tl.trans(c), input_precision="ieee")
            s += tl.dot(q_p, tl.trans(pe), input_precision="ieee")
        else:
            s = tl.dot(q_c, tl.trans(c))
            s += tl.dot(q_p, tl.trans(pe))
        s = tl.where(tmask[None, :], s * scale, float("-inf"))
        m, l_sum, acc = online_softmax(s, c, m, l_sum, acc, IEEE, False)
    store_partial(Mid + b * stride_mb + heads[:, None] * stride_mh + split * stride_ms
                  + offs_r[None, :], Lse + b * stride_lb + heads * stride_lh + split,
                  acc, m, l_sum, start >= ctx, hmask, split)


def supported(r: int, dr: int) -> bool:
    """tl.arange needs powers of two (DeepSeek: r = 512, dr = 64)."""
    return all(v >= 16 and v & (v - 1) == 0 for v in (r, dr))


def paged_mla_decode(q, cache, block_tables, ctx_lens, scale: float, max_context: int, r: int):
    """q (B, nh, r + dr) in latent space; cache (NB, bs, 1, r + dr) -> (B, nh, r)."""
    B, nh, D = q.shape
    bs = cache.shape[1]
    assert q.stride(2) == 1 and cache.stride(3) == 1
    splits = num_splits(B, triton.cdiv(nh, HEAD_TILE), max_context)
    mid = torch.empty(B, nh, splits, r, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, nh, splits, dtype=torch.float32, device=q.device)
    _mla_split_kernel[(B, triton.cdiv(nh, HEAD_TILE), splits)](
        q,
        cache,
        mid,
        lse,
        block_tables,
        ctx_lens,
        scale,
        nh,
        q.stride(0),
        q.stride(1),
        cache.stride(0),
        cache.stride(1),
        block_tables.stride(0),
        mid.stride(0),
        mid.stride(1),
        mid.stride(2),
        lse.stride(0),
        lse.stride(1),
        R=r,
        DR=D - r,
        HT=HEAD_TILE,
        BS=bs,
        TILE_N=TILE if q.dtype != torch.float32 else 16,  # float32 tiles: half the tokens
        S=splits,
        UNIT=TILE,  # a multiple of either tile below
        IEEE=q.dtype == torch.float32,
        num_warps=4,
        **launch_kw(),
    )
    out = q.new_empty(B, nh, r)
    merge_splits(mid, lse, out, ctx_lens, unit=TILE)
    return out
