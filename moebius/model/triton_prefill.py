"""Paged prefill attention in Triton: every prefill chunk of a step in one launch.

One program per (query tile of a chunk, query head) reads the chunk's keys and values straight
from the pool through its block table (cached prefix pages and the pages just written alike),
with causal masking offset by the chunk's start position and an online softmax in float32.
No gather copy, no mask tensor, no per-sequence loop: a chunked prefill, a prefix-cache hit and
a fresh prompt are the same case.

Shape legend: T tokens, nh query heads, kvh KV heads, G = nh/kvh, d head dim, bs block size,
C chunks, BM query tokens a tile, BN keys an iteration.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moebius.model.triton_attention import online_softmax

LOG2E = 1.4426950408889634


# (BM, BN, warps, stages): best at 1 × 2048 and within 6% at 16 × 512 and 2 × 4096 of a
# 36-point sweep on H100 (session 11, `python -m moebius.bench.prefill_kernels`).
LAUNCH = (64, 64, 4, 2)


@triton.jit
def _keys(q, K, V, tables, c, k0, qpos, end, kvh, m_i, l_i, acc, scale, stride_kb, stride_ks,
          stride_kh, stride_tc, BS: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
          MASK: tl.constexpr, IEEE: tl.constexpr):
    """The online softmax over keys k0 .. k0 + BN: (m_i, l_i, acc) updated. MASK: causal, and
    keys from ``end`` on are masked; else every key is visible to every query."""
    kpos = k0 + tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    kmask = kpos < end
    blk = tl.load(tables + c * stride_tc + kpos // BS, mask=kmask, other=0)
    off = blk[:, None] * stride_kb + (kpos % BS)[:, None] * stride_ks + kvh * stride_kh
    if MASK:
        k = tl.load(K + off + offs_d[None, :], mask=kmask[:, None], other=0.0)
        v = tl.load(V + off + offs_d[None, :], mask=kmask[:, None], other=0.0)
    else:
        k = tl.load(K + off + offs_d[None, :])
        v = tl.load(V + off + offs_d[None, :])
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * scale  # scale carries log2(e): exp2 below
    if MASK:
        s = tl.where((kpos[None, :] <= qpos[:, None]) & kmask[None, :], s, float("-inf"))
    return online_softmax(s, v, m_i, l_i, acc, IEEE, True)


@triton.jit
def _prefill_kernel(
    Q,
    K,
    V,
    O,
    tables,
    tile_chunk,
    tile_start,
    chunk_token,
    chunk_len,
    chunk_pos,
    scale,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_ot,
    stride_oh,
    stride_tc,
    GROUP: tl.constexpr,
    BS: tl.constexpr,
    D: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    IEEE: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    c = tl.load(tile_chunk + tile)
    m0 = tl.load(tile_start + tile)  # first query of the tile, within its chunk
    tok0 = tl.load(chunk_token + c)
    n = tl.load(chunk_len + c)
    p0 = tl.load(chunk_pos + c)
    kvh = head // GROUP
    offs_m = m0 + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    mmask = offs_m < n
    q = tl.load(
        Q + (tok0 + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=mmask[:, None],
        other=0.0,
    )
    qpos = p0 + offs_m
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    # Keys before the tile's first query are seen by all its queries: no mask there. The rest,
    # up to its last query, is masked causally (keys past it are masked anyway).
    full = (p0 + m0) // BN * BN
    end = p0 + tl.minimum(m0 + BM, n)
    for k0 in range(0, full, BN):
        m_i, l_i, acc = _keys(q, K, V, tables, c, k0, qpos, end, kvh, m_i, l_i, acc, scale,
                              stride_kb, stride_ks, stride_kh, stride_tc, BS, D, BN, False, IEEE)
    for k0 in range(full, end, BN):
        m_i, l_i, acc = _keys(q, K, V, tables, c, k0, qpos, end, kvh, m_i, l_i, acc, scale,
                              stride_kb, stride_ks, stride_kh, stride_tc, BS, D, BN, True, IEEE)
    out = acc / tl.where(mmask, l_i, 1.0)[:, None]
    tl.store(
        O + (tok0 + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        out.to(O.dtype.element_ty),
        mask=mmask[:, None],
    )


@dataclass
class PrefillPlan:
    """Device tensors describing a step's prefill chunks, built once and shared by all layers."""

    tables: torch.Tensor  # (C, max_blocks) long, padded with 0
    tile_chunk: torch.Tensor  # (tiles,) int32
    tile_start: torch.Tensor  # (tiles,) int32
    chunk_token: torch.Tensor  # (C,) int32: flat index of the chunk's first token
    chunk_len: torch.Tensor  # (C,) int32
    chunk_pos: torch.Tensor  # (C,) int32: position of the chunk's first token
    launch: tuple[int, int, int, int]  # (BM, BN, warps, stages); tiles are BM queries

    @classmethod
    def build(cls, chunks, device, launch=None) -> PrefillPlan:
        """From ``attention.PrefillChunk``s (token_start, num_tokens, start_pos, block_table);
        ``launch`` overrides ``LAUNCH`` (tuning)."""
        launch = launch or LAUNCH
        width = max(len(c.block_table) for c in chunks)
        tables = torch.zeros(len(chunks), width, dtype=torch.long, device=device)
        for i, c in enumerate(chunks):
            tables[i, : len(c.block_table)] = c.block_table
        tile_chunk, tile_start = [], []
        for i, c in enumerate(chunks):
            for m0 in range(0, c.num_tokens, launch[0]):
                tile_chunk.append(i)
                tile_start.append(m0)

        def ints(values):
            return torch.tensor(values, dtype=torch.int32, device=device)

        return cls(
            tables=tables,
            tile_chunk=ints(tile_chunk),
            tile_start=ints(tile_start),
            chunk_token=ints([c.token_start for c in chunks]),
            chunk_len=ints([c.num_tokens for c in chunks]),
            chunk_pos=ints([c.start_pos for c in chunks]),
            launch=launch,
        )


def paged_prefill_attention(q, k_cache, v_cache, plan: PrefillPlan, scale: float, out) -> None:
    """Write into ``out`` (T, nh, d) the attention of every prefill token of ``q`` (T, nh, d)
    over its sequence's pages in ``k_cache``/``v_cache`` (NB, bs, kvh, d), keys already written."""
    nh, d = q.shape[1], q.shape[2]
    bs, kvh = k_cache.shape[1], k_cache.shape[2]
    bm, bn, warps, stages = plan.launch
    grid = (plan.tile_chunk.numel(), nh)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        plan.tables,
        plan.tile_chunk,
        plan.tile_start,
        plan.chunk_token,
        plan.chunk_len,
        plan.chunk_pos,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        out.stride(0),
        out.stride(1),
        plan.tables.stride(0),
        GROUP=nh // kvh,
        BS=bs,
        D=d,
        BM=bm,
        BN=bn,
        IEEE=q.dtype == torch.float32,
        num_warps=warps,
        num_stages=stages,
    )
