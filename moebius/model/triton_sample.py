"""The sampler's Gumbel-max draw in Triton: ``argmax(scaled + gumbel)`` for every row in one
pass over the scaled logits, the noise made in registers.

``sampler.sample`` builds the counter-based noise as (B, V) int64 and float64 tensors, about
two dozen elementwise passes over B·V·8 bytes (at batch 256 and a 151,936-token vocabulary,
311 MB each): several ms a step on a GPU whenever any request samples with a temperature (RL
rollouts do). Here each program takes a slice of a row, hashes (seed, step, token id) exactly
as ``sampler.uniform_noise`` does (the same 32-bit mix on int64, the same float64 arithmetic),
and keeps the first maximum; a second small step picks the first of the slices' maxima, so
ties go to the lowest token id as ``torch.argmax`` sends them. Same draws as the eager path.

``filtered_draw`` does the same draw under top-k / top-p / min-p without sorting the row
(the eager filter sorts each (B, V) row: ~5 ms at batch 256 on H100, session 12). Each
filter keeps an upper set of the row (token x is kept iff fewer than k tokens and less than
top_p of the probability lie strictly above it, and p(x) >= min_p · p_max), so the Gumbel
argmax over the kept tokens can be found by rejection: take the argmax over every token; if
it is not kept, no token at or below it is, so take the argmax over the tokens above it;
repeat. The first pass finds the row's max and softmax sum with the first candidate; a
check counts the tokens and mass above a candidate (no noise, so a kept first candidate, the
common case, costs one cheap pass); a dropped one costs a noise pass over the blocks holding
tokens above it. Mass-weighted pivots: about log2 of the dropped mass over the kept one
rounds. Same tokens as the eager filter + draw, ties at the cut included (the eager filter
keeps every token equal to its last kept one), except where a token's mass above lies
within float32 rounding of top_p. The first pass runs on gumbel_max's slices (up to 32
programs a row at small batches); the checks and redraws in one program a row. Session 13,
one H100 (`python -m moebius.bench.sampling`): at batch 256 the draw with top-p 0.9 5.68 ->
1.08 ms, with top-k 50 + min-p 5.68 -> 1.30 ms, the same tokens.

Shape legend: B rows, V vocabulary, S slices a row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048  # tokens an iteration


@triton.jit
def _hash32(x):
    """sampler._hash32 (lowbias32) on int64 values."""
    x = x & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _neg_gumbel(base, v):
    """Minus the float64 Gumbel noise of token ids v in the row whose hash base is ``base``
    (subtracted as the eager path's ``x - log(-log(u))``: the same SASS as before)."""
    bits = _hash32(base + v)
    u = ((bits >> 8).to(tl.float64) + 0.5) * (1.0 / 16777216.0)  # exact: a power of 2
    return tl.log(-tl.log(u))


@triton.jit
def _row_base(seeds, steps, r):
    """A row's hash base, as sampler.uniform_noise builds it from its seed and step."""
    seed = tl.load(seeds + r).to(tl.int64)
    step = tl.load(steps + r).to(tl.int64)
    return _hash32(_hash32(seed) ^ (step * 0x9E3779B1)) * 0x85EBCA6B + 0x632BE5AB


@triton.jit
def _gumbel_max_kernel(scaled, seeds, steps, best_val, best_idx, slice_max, slice_sum, V,
                       stride_s, per_slice, S: tl.constexpr, BLOCK: tl.constexpr,
                       STATS: tl.constexpr):
    """A slice's first maximum of x + noise (value, token); with STATS also its max x and
    the sum of exp(x - that max) (filtered_draw's softmax sum)."""
    r = tl.program_id(0)
    sl = tl.program_id(1)
    base = _row_base(seeds, steps, r)
    lo = sl * per_slice
    hi = tl.minimum(lo + per_slice, V)
    best = tl.full([], float("-inf"), tl.float64)
    arg = tl.full([], 0, tl.int64)
    mx = tl.full([], float("-inf"), tl.float32)
    z = tl.full([], 0.0, tl.float32)
    for v0 in range(lo, hi, BLOCK):
        v = v0 + tl.arange(0, BLOCK)
        keep = v < hi
        x = tl.load(scaled + r.to(tl.int64) * stride_s + v, mask=keep, other=float("-inf"))
        if STATS:
            m_new = tl.maximum(mx, tl.max(x, 0))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # masked (-inf) logits so far
            z = z * tl.exp(mx - shift) + tl.sum(tl.exp(x - shift), 0)
            mx = m_new
        y = tl.where(keep, x.to(tl.float64) - _neg_gumbel(base, v), float("-inf"))
        m = tl.max(y, 0)
        i = tl.argmax(y, 0, tie_break_left=True).to(tl.int64) + v0
        take = m > best  # strictly: an earlier block keeps a tie
        arg = tl.where(take, i, arg)
        best = tl.where(take, m, best)
    tl.store(best_val + r * S + sl, best)
    tl.store(best_idx + r * S + sl, arg)
    if STATS:
        tl.store(slice_max + r * S + sl, mx)
        tl.store(slice_sum + r * S + sl, z)


def _slices(scaled: torch.Tensor, seeds, steps, stats: bool):
    """``_gumbel_max_kernel`` over (B, S) programs, S slices a row (enough programs for the
    GPU at small batches): per slice (best value, its token, max x, softmax sum) or, without
    ``stats``, the first two."""
    B, V = scaled.shape
    assert scaled.stride(1) == 1
    S = max(1, min(32, triton.cdiv(256, max(B, 1)), triton.cdiv(V, BLOCK)))
    per_slice = triton.cdiv(triton.cdiv(V, S), BLOCK) * BLOCK
    vals = torch.empty(B, S, dtype=torch.float64, device=scaled.device)
    idx = torch.empty(B, S, dtype=torch.long, device=scaled.device)
    mx = z = vals  # unused without stats
    if stats:
        mx = torch.empty(B, S, dtype=torch.float32, device=scaled.device)
        z = torch.empty(B, S, dtype=torch.float32, device=scaled.device)
    if B:
        _gumbel_max_kernel[(B, S)](scaled, seeds, steps, vals, idx, mx, z, V, scaled.stride(0),
                                   per_slice, S=S, BLOCK=BLOCK, STATS=stats, num_warps=8)
    return vals, idx, mx, z


def gumbel_max(scaled: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """``argmax(scaled.double() + gumbel)`` per row, the noise ``sampler.uniform_noise``'s:
    scaled (B, V) float32 (temperature applied, filtered tokens -inf); seeds, steps (B,) int64.
    Token ids (B,) long."""
    vals, idx, _, _ = _slices(scaled, seeds, steps, stats=False)
    return idx.gather(1, vals.argmax(1, keepdim=True)).squeeze(1)


@triton.jit
def _kept(row, arg, mx, z, k, p, floor, V, BLOCK: tl.constexpr):
    """Whether the filters keep token ``arg``: fewer than k tokens and less than top_p of the
    mass (z: the row's softmax sum after subtracting its max mx) strictly above it, and
    p(arg) >= min_p · p_max. The row's max is always kept, as the eager filter's first token.
    One pass over the row, no noise."""
    xc = tl.load(row + arg)
    count = tl.full([], 0, tl.int32)
    mass = tl.full([], 0.0, tl.float32)
    for v0 in range(0, V, BLOCK):
        v = v0 + tl.arange(0, BLOCK)
        x = tl.load(row + v, mask=v < V, other=float("-inf"))
        above = x > xc
        count += tl.sum(above.to(tl.int32), 0)
        mass += tl.sum(tl.where(above, tl.exp(x - mx), 0.0), 0)
    return (count == 0) | ((count < k) & ((p >= 1.0) | (mass < p * z))
                           & (tl.exp(xc - mx) >= floor))


@triton.jit
def _argmax_above(row, base, arg, V, BLOCK: tl.constexpr):
    """The first argmax of x + noise over the tokens with x above token ``arg``'s; blocks
    with none above make no noise (in late rounds, most)."""
    xc = tl.load(row + arg)
    best = tl.full([], float("-inf"), tl.float64)
    nxt = arg
    for v0 in range(0, V, BLOCK):
        v = v0 + tl.arange(0, BLOCK)
        x = tl.load(row + v, mask=v < V, other=float("-inf"))
        if tl.max(x, 0) > xc:
            y = tl.where(x > xc, x.to(tl.float64) - _neg_gumbel(base, v), float("-inf"))
            i = tl.argmax(y, 0, tie_break_left=True).to(tl.int64) + v0
            take = tl.max(y, 0) > best  # strictly: an earlier block keeps a tie
            nxt = tl.where(take, i, nxt)
            best = tl.where(take, tl.max(y, 0), best)
    return nxt


@triton.jit
def _filtered_draw_kernel(scaled, top_k, top_p, min_p, seeds, steps, best_val, best_idx,
                          slice_max, slice_sum, out, V, stride_s, S: tl.constexpr,
                          S_PAD: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    row = scaled + r.to(tl.int64) * stride_s
    base = _row_base(seeds, steps, r)
    k = tl.load(top_k + r)
    k = tl.where(k > 0, k, V)
    p = tl.load(top_p + r)
    floor = tl.load(min_p + r)
    # The slices' first pass: the row's max and softmax sum, the first argmax of x + noise.
    offs = tl.arange(0, S_PAD)
    smask = offs < S
    ms = tl.load(slice_max + r * S + offs, mask=smask, other=float("-inf"))
    mx = tl.max(ms, 0)
    shift = tl.where(mx == float("-inf"), 0.0, mx)
    z = tl.sum(tl.load(slice_sum + r * S + offs, mask=smask, other=0.0) * tl.exp(ms - shift), 0)
    vals = tl.load(best_val + r * S + offs, mask=smask, other=float("-inf"))
    idxs = tl.load(best_idx + r * S + offs, mask=smask, other=0)
    arg = tl.min(tl.where(vals == tl.max(vals, 0), idxs, V), 0)  # the first slice's: lowest
    # Rounds: a candidate the filters drop takes every token at or below it along.
    kept = _kept(row, arg, mx, z, k, p, floor, V, BLOCK)
    while kept == 0:
        arg = _argmax_above(row, base, arg, V, BLOCK)
        kept = _kept(row, arg, mx, z, k, p, floor, V, BLOCK)
    tl.store(out + r, arg)


def filtered_draw(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """``gumbel_max`` of ``sampler._filter(scaled)`` without its sort: scaled (B, V) float32
    (temperature applied); top_k (B,) long (0: off), top_p, min_p (B,) float32; seeds, steps
    (B,) int64. Token ids (B,) long. The first pass is gumbel_max's slices (with each slice's
    max and softmax sum); then one program a row checks candidates and draws again above."""
    B, V = scaled.shape
    vals, idx, mx, z = _slices(scaled, seeds, steps, stats=True)
    out = torch.empty(B, dtype=torch.long, device=scaled.device)
    if B:
        S = vals.shape[1]
        _filtered_draw_kernel[(B,)](scaled, top_k, top_p, min_p, seeds, steps, vals, idx, mx,
                                    z, out, V, scaled.stride(0), S=S,
                                    S_PAD=max(2, triton.next_power_of_2(S)), BLOCK=BLOCK,
                                    num_warps=8)
    return out
