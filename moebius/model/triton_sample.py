"""The sampler's Gumbel-max draw in Triton: ``argmax(scaled + gumbel)`` for every row in one
pass over the scaled logits, the noise made in registers.

``sampler.sample`` builds the counter-based noise as (B, V) int64 and float64 tensors, about
two dozen elementwise passes over B·V·8 bytes (at batch 256 and a 151,936-token vocabulary,
311 MB each): several ms a step on a GPU whenever any request samples with a temperature (RL
rollouts do). Here each program takes a slice of a row, hashes (seed, step, token id) exactly
as ``sampler.uniform_noise`` does (the same 32-bit mix on int64, the same float64 arithmetic),
and keeps the first maximum; a second small step picks the first of the slices' maxima, so
ties go to the lowest token id as ``torch.argmax`` sends them. Same draws as the eager path.

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
def _gumbel_max_kernel(scaled, seeds, steps, best_val, best_idx, V, stride_s, per_slice,
                       S: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    sl = tl.program_id(1)
    seed = tl.load(seeds + r).to(tl.int64)
    step = tl.load(steps + r).to(tl.int64)
    row = _hash32(_hash32(seed) ^ (step * 0x9E3779B1))
    base = row * 0x85EBCA6B + 0x632BE5AB
    lo = sl * per_slice
    hi = tl.minimum(lo + per_slice, V)
    best = tl.full([], float("-inf"), tl.float64)
    arg = tl.full([], 0, tl.int64)
    for v0 in range(lo, hi, BLOCK):
        v = v0 + tl.arange(0, BLOCK)
        keep = v < hi
        x = tl.load(scaled + r.to(tl.int64) * stride_s + v, mask=keep, other=float("-inf"))
        bits = _hash32(base + v)
        u = ((bits >> 8).to(tl.float64) + 0.5) * (1.0 / 16777216.0)  # exact: a power of 2
        y = tl.where(keep, x.to(tl.float64) - tl.log(-tl.log(u)), float("-inf"))
        m = tl.max(y, 0)
        i = tl.argmax(y, 0, tie_break_left=True).to(tl.int64) + v0
        take = m > best  # strictly: an earlier block keeps a tie
        arg = tl.where(take, i, arg)
        best = tl.where(take, m, best)
    tl.store(best_val + r * S + sl, best)
    tl.store(best_idx + r * S + sl, arg)


def gumbel_max(scaled: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """``argmax(scaled.double() + gumbel)`` per row, the noise ``sampler.uniform_noise``'s:
    scaled (B, V) float32 (temperature applied, filtered tokens -inf); seeds, steps (B,) int64.
    Token ids (B,) long."""
    B, V = scaled.shape
    assert scaled.stride(1) == 1
    S = max(1, min(32, triton.cdiv(256, max(B, 1)), triton.cdiv(V, BLOCK)))
    per_slice = triton.cdiv(triton.cdiv(V, S), BLOCK) * BLOCK
    vals = torch.empty(B, S, dtype=torch.float64, device=scaled.device)
    idx = torch.empty(B, S, dtype=torch.long, device=scaled.device)
    if B:
        _gumbel_max_kernel[(B, S)](scaled, seeds, steps, vals, idx, V, scaled.stride(0),
                                   per_slice, S=S, BLOCK=BLOCK, num_warps=8)
    return idx.gather(1, vals.argmax(1, keepdim=True)).squeeze(1)
