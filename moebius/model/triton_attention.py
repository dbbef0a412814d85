"""Paged decode attention in Triton: one program per (sequence, KV head, context split) reads
that sequence's pages straight from the pool through its block table (no gather copy), for all
query heads of the KV head's group at once, with an online softmax; a second small kernel
merges the splits. The number of splits S follows the batch and the longest context the launch
allows (in CUDA graphs: the engine's), and each sequence divides its own context among them
(whole tiles; a split past it stores nothing and the merge reads only those before), so a
short context in a graph sized for 40,960 tokens is still spread over many programs instead
of one reading it all. With one split (from 34 sequences up at Qwen3's 4 KV heads) the split
kernel stores the output itself and no merge is launched. Shapes are fixed by the batch, so it
runs inside CUDA graphs. Measured on H200 (session 9, BENCHMARKS.md): with Qwen3's 40,960-token
graphs, batch 1 2.99 -> 2.82 ms a step against splits sized by the longest context. The
context length and the first tile's block ids are read before the PDL wait (the host wrote
them), so after it the split kernel goes straight to the keys and values (triton_pdl.py).

Measured and dropped: the q/k norm + rotary + KV write inside this kernel (session 9, H200:
batch 1 +0.03 to +0.10 ms against triton_qk's own launch; commit 69bfdf4 has it); the last
split program of a (sequence, KV head) merging the splits in the same launch (session 7, H100;
arrival counters, with the router's top-k and alignment likewise folded into the norm's
launch): batch 1 3.66 -> 3.63 ms, batch 4 unchanged, within run-to-run spread (PDL already
hides a launch's ramp); commit dd91000 has it.

Shape legend: B sequences, nh query heads, kvh KV heads, G = nh/kvh, d head dim, bs block size,
S context splits (each a multiple of TILE tokens).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moebius.model.triton_pdl import launch_kw, pdl_launch_next, pdl_wait

TILE = 64  # tokens per inner iteration


@triton.jit
def tile_blocks(table, t0, start, end, first, offs_n, BS: tl.constexpr):
    """The pool blocks of the tile of tokens t0 .. t0 + len(offs_n) of a split starting at
    ``start``, from the sequence's block ``table``: the first tile's, ``first``, were read
    before the PDL wait (``first_blocks``). (tokens, their mask, their blocks)."""
    tok = t0 + offs_n
    tmask = tok < end
    blk = tl.load(table + tok // BS, mask=tmask & (t0 > start), other=0)
    return tok, tmask, tl.where(t0 > start, blk, first)


@triton.jit
def first_blocks(table, start, end, offs_n, BS: tl.constexpr):
    """The blocks of a split's first tile (the host wrote the table: read before the wait)."""
    return tl.load(table + (start + offs_n) // BS, mask=start + offs_n < end, other=0)


@triton.jit
def _tile(q, k, v, tmask, scale, m, l_sum, acc, IEEE: tl.constexpr):
    """The online softmax over one tile of keys k and values v (tmask: the tile's tokens)."""
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(tmask[None, :], s * scale, float("-inf"))
    return online_softmax(s, v, m, l_sum, acc, IEEE, False)


@triton.jit
def online_softmax(s, v, m, l_sum, acc, IEEE: tl.constexpr, EXP2: tl.constexpr):
    """One step of the online softmax (shared by the decode, MLA and prefill kernels): scores
    s (rows, keys; masked keys -inf) against values v; the running max m, sum l_sum and
    weighted values acc updated. EXP2: the scores carry log2(e)."""
    m_new = tl.maximum(m, tl.max(s, 1))
    if EXP2:
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
    else:
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
    l_sum = l_sum * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_sum, acc


@triton.jit
def _decode_split_kernel(
    Q,
    K,
    V,
    Mid,
    Lse,
    O,
    tables,
    ctx_lens,
    scale,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_bt,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BS: tl.constexpr,
    D: tl.constexpr,
    TILE_N: tl.constexpr,
    S: tl.constexpr,
    IEEE: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_launch_next(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    # Before the wait: what the host wrote before the step (context length, block table);
    # keys and values after it (the q/k kernel just before writes the newest token's).
    ctx = tl.load(ctx_lens + b)
    split_len = split_length(ctx, S, TILE_N)
    start = split * split_len
    end = tl.minimum(start + split_len, ctx)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, TILE_N)
    gmask = offs_g < GROUP
    heads = h * GROUP + offs_g
    first = first_blocks(tables + b * stride_bt, start, end, offs_n, BS)
    pdl_wait(PDL)
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=gmask[:, None],
        other=0.0,
    )
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    for t0 in range(start, end, TILE_N):
        tok, tmask, blk = tile_blocks(tables + b * stride_bt, t0, start, end, first, offs_n, BS)
        off = blk[:, None] * stride_kb + (tok % BS)[:, None] * stride_ks + h * stride_kh
        k = tl.load(K + off + offs_d[None, :], mask=tmask[:, None], other=0.0)
        v = tl.load(V + off + offs_d[None, :], mask=tmask[:, None], other=0.0)
        m, l_sum, acc = _tile(q, k, v, tmask, scale, m, l_sum, acc, IEEE)
    if S == 1:  # the whole context in this program: no merge (an empty pad row stores 0)
        out = acc / tl.where(l_sum == 0.0, 1.0, l_sum)[:, None]
        tl.store(O + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=gmask[:, None])
    else:
        store_partial(Mid + b * stride_mb + heads[:, None] * stride_mh + split * stride_ms
                      + offs_d[None, :], Lse + b * stride_lb + heads * stride_lh + split,
                      acc, m, l_sum, start >= ctx, gmask, split)


@triton.jit
def store_partial(mid_ptrs, lse_ptrs, acc, m, l_sum, empty, rmask, split):
    """A split's normalised partial output and log-sum-exp for the merge. A split past the
    context (``empty``) stores nothing but the first: the merge reads only the ones before."""
    keep = rmask & (~empty | (split == 0))
    out = tl.where(empty, 0.0, acc / tl.where(empty, 1.0, l_sum)[:, None])
    lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, l_sum)))
    tl.store(mid_ptrs, out, mask=keep[:, None])
    tl.store(lse_ptrs, lse, mask=keep)


@triton.jit
def _merge_kernel(
    Mid,
    Lse,
    O,
    ctx_lens,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    S: tl.constexpr,
    S_PAD: tl.constexpr,
    UNIT: tl.constexpr,
    DT: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_launch_next(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.program_id(2) * DT + tl.arange(0, DT)
    # only the splits that hold context (at least the first); the host wrote ctx_lens
    ctx = tl.load(ctx_lens + b)
    smask = offs_s < tl.maximum(tl.cdiv(ctx, split_length(ctx, S, UNIT)), 1)
    pdl_wait(PDL)
    lse = tl.load(Lse + b * stride_lb + h * stride_lh + offs_s, mask=smask, other=float("-inf"))
    mid = tl.load(  # with lse, not after its reductions' barriers (one round trip, not two)
        Mid + b * stride_mb + h * stride_mh + offs_s[:, None] * stride_ms + offs_d[None, :],
        mask=smask[:, None],
        other=0.0,
    )
    mx = tl.max(lse, 0)
    w = tl.where(smask, tl.exp(lse - mx), 0.0)
    w = w / tl.sum(w, 0)
    out = tl.sum(mid * w[:, None], 0)
    tl.store(O + b * stride_ob + h * stride_oh + offs_d, out.to(O.dtype.element_ty))


MERGE_COLUMNS = 128  # output columns a merge program sums (a (splits, 128) tile of partials)


def merge_splits(mid, lse, out, ctx_lens, unit: int = TILE) -> None:
    """out (B, nh, d) from the splits' partial outputs mid (B, nh, S, d) and their log-sum-
    exps lse (B, nh, S); ``unit``: the split kernel's UNIT (splits hold whole units). A
    program sums MERGE_COLUMNS columns of one head: MLA's 512-wide latent in one program held
    a (64, 512) float32 tile, spilled, and cost DeepSeek-V2-Lite batch 8 +1.2 ms a step
    (session 12, H100). With four programs a latent (session 13, H100): its merge 455 -> 204
    µs a step at batch 8, the step 9.82 -> 9.55 ms, batch 1 5.14 -> 4.88 ms."""
    B, nh, S, d = mid.shape
    dt = min(d, MERGE_COLUMNS)
    assert d % dt == 0
    _merge_kernel[(B, nh, d // dt)](
        mid, lse, out, ctx_lens, mid.stride(0), mid.stride(1), mid.stride(2), lse.stride(0),
        lse.stride(1), out.stride(0), out.stride(1), S=S,
        S_PAD=max(2, triton.next_power_of_2(S)), UNIT=unit, DT=dt,
        **launch_kw(),
    )


@triton.jit
def split_length(ctx, S: tl.constexpr, UNIT: tl.constexpr):
    """Tokens in each of a sequence's S context splits: its own context over S, in whole
    UNITs (the splits past it hold nothing)."""
    return tl.cdiv(tl.cdiv(tl.maximum(ctx, 1), S), UNIT) * UNIT


def num_splits(batch: int, num_kv_heads: int, max_context: int) -> int:
    """Enough programs to fill the GPU at small batches, at least TILE tokens per split."""
    want = max(1, 264 // max(batch * num_kv_heads, 1))
    return max(1, min(want, triton.cdiv(max_context, TILE), 64))


def paged_decode_attention(
    q, k_cache, v_cache, block_tables, ctx_lens, scale: float, max_context: int
) -> torch.Tensor:
    """q (B, nh, d); caches (NB, bs, kvh, d); block_tables (B, max_blocks); ctx_lens (B,)."""
    B, nh, d = q.shape
    bs, kvh = k_cache.shape[1], k_cache.shape[2]
    group = nh // kvh
    splits = num_splits(B, kvh, max_context)
    out = torch.empty_like(q)
    mid = lse = out  # one split: the split kernel stores the output itself
    if splits > 1:
        mid = torch.empty(B, nh, splits, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(B, nh, splits, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(B, kvh, splits)](
        q, k_cache, v_cache, mid, lse, out, block_tables, ctx_lens, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), mid.stride(0), mid.stride(1), mid.stride(2),
        lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        BS=bs,
        D=d,
        TILE_N=TILE,
        S=splits,
        IEEE=q.dtype == torch.float32,
        **launch_kw(),
    )
    if splits > 1:
        merge_splits(mid, lse, out, ctx_lens)
    return out
