"""``x @ w.T`` for a handful of tokens (decode at small batch) in Triton.

At 1-8 tokens a projection is a matrix-vector product: all the time is reading ``w`` once.
One program per BN output rows streams its (BN, K) slab of ``w`` through a software pipeline
of BK-wide tiles (the token rows padded to 16 for the matrix unit, whose work is free here)
and writes its outputs; no split over K, so the sum order is fixed and the result
deterministic. ``bench/gemv.py`` times it against cuBLAS; ``ops.linear`` uses it only where
that measurement says it wins.

Shape legend: T tokens (≤ MAX_TOKENS), N outputs, K inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moebius.model.triton_pdl import launch_kw, pdl_wait, prefetch_l2

MAX_TOKENS = 8


@triton.jit
def _gemv_kernel(
    X,
    W,
    Y,
    T,
    N,
    K,
    stride_xt,
    stride_wn,
    stride_yt,
    BN: tl.constexpr,
    BK: tl.constexpr,
    T_PAD: tl.constexpr,
    K_LINES: tl.constexpr,
    PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BN + tl.arange(0, BN)
    offs_t = tl.arange(0, T_PAD)
    nmask = offs_n < N
    tmask = offs_t < T
    acc = tl.zeros([T_PAD, BN], tl.float32)
    w_rows = W + tl.minimum(offs_n, N - 1).to(tl.int64)[:, None] * stride_wn
    # The weights stream into L2 while the kernel before finishes (PDL); x waits for it.
    line_k = tl.minimum(tl.arange(0, K_LINES) * 64, K - 1)
    prefetch_l2(w_rows + line_k[None, :], PDL)
    pdl_wait(PDL)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        kmask = offs_k < K
        x = tl.load(X + offs_t[:, None] * stride_xt + offs_k[None, :],
                    mask=tmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_rows + offs_k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w))
    tl.store(Y + offs_t[:, None] * stride_yt + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=tmask[:, None] & nmask[None, :])


def tiles(N: int, K: int) -> tuple[int, int, int, int]:
    """(BN, BK, stages, warps): the fastest of ``bench/gemv.py``'s shapes on H200 for the
    Qwen3-30B-A3B projections (router and o: 16x512; q/k/v and lm_head: 64x128)."""
    return (16, 512, 3, 4) if N <= 512 or K >= 4096 else (64, 128, 4, 4)


def gemv(x: torch.Tensor, w: torch.Tensor, bn: int | None = None, bk: int = 256,
         stages: int = 4, warps: int = 4) -> torch.Tensor:
    """x (T, K) @ w (N, K).T -> (T, N), T <= MAX_TOKENS, both with unit last stride; tiles
    from ``tiles`` unless given."""
    T, K = x.shape
    N = w.shape[0]
    assert T <= MAX_TOKENS and x.stride(1) == 1 and w.stride(1) == 1
    if bn is None:
        bn, bk, stages, warps = tiles(N, K)
    y = torch.empty(T, N, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(N, bn),)](
        x, w, y, T, N, K, x.stride(0), w.stride(0), y.stride(0),
        BN=bn, BK=bk, T_PAD=16, K_LINES=triton.next_power_of_2(triton.cdiv(K, 64)),
        num_warps=warps, num_stages=stages,
        **launch_kw(),
    )
    return y
