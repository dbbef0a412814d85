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

from moebius.model.triton_pdl import launch_kw, pdl_wait

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
):
    pdl_wait()
    pid = tl.program_id(0)
    offs_n = pid * BN + tl.arange(0, BN)
    offs_t = tl.arange(0, T_PAD)
    nmask = offs_n < N
    tmask = offs_t < T
    acc = tl.zeros([T_PAD, BN], tl.float32)
    w_rows = W + offs_n.to(tl.int64)[:, None] * stride_wn
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        kmask = offs_k < K
        x = tl.load(X + offs_t[:, None] * stride_xt + offs_k[None, :],
                    mask=tmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_rows + offs_k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w))
    tl.store(Y + offs_t[:, None] * stride_yt + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=tmask[:, None] & nmask[None, :])


def gemv(x: torch.Tensor, w: torch.Tensor, bn: int = 16, bk: int = 256, stages: int = 4,
         warps: int = 4) -> torch.Tensor:
    """x (T, K) @ w (N, K).T -> (T, N), T <= MAX_TOKENS, both with unit last stride."""
    T, K = x.shape
    N = w.shape[0]
    assert T <= MAX_TOKENS and x.stride(1) == 1 and w.stride(1) == 1
    y = torch.empty(T, N, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(N, bn),)](
        x, w, y, T, N, K, x.stride(0), w.stride(0), y.stride(0),
        BN=bn, BK=bk, T_PAD=16, num_warps=warps, num_stages=stages,
        **launch_kw(),
    )
    return y
