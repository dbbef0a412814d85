"""Projections of one decode token (GEMV) whose weights are read before the kernel waits.

At batch 1 a projection is latency-bound: cuBLAS reads q/k/v (21 MB) in ~8 µs and o (17 MB)
in ~8.6 µs on H200, 1.6-2.2x the bytes' floor, and each cuBLAS launch breaks the chain of
programmatic dependent launches (triton_pdl.py). Here each program holds a whole [BN, K] slab
of the weight (32 KB) in registers, loaded *before* ``pdl_wait``: weights are no kernel's
output, so the programs, resident while the kernels before them finish (PDL), stream their
slab during those kernels' latency-bound tails; after the wait only the few activation rows
(from L2) and the dot remain. (Session 3 prefetched into L2 with the next launch held back
until after the wait, and lost: the prefetches were evicted; registers are not.)

Measured on H100 (session 7, BENCHMARKS.md): batch-1 step 3.63 -> 3.41 ms (-6%) with q/k/v
and o through this kernel, in three repeats; at 2 tokens it ties cuBLAS, at 3 and 4 it loses
(6.19 -> 6.35, 7.17 -> 7.44 ms), so only one token takes it. Slabs of 8K-16K elements and 4-8
warps tie; 32K loses.

Shape legend: T tokens, K input features, N outputs, BN rows a program.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moebius.model.triton_pdl import launch_kw, pdl_wait

MAX_TOKENS = 1  # more tokens: cuBLAS (2 tie, 3 and 4 lose; above)
# Weight elements a program holds, and its warps: 16,384 over 8 warps takes ~110 registers a
# thread (sm_90 resource usage; 32,768 over 4 warps spilled), two programs an SM.
SLAB = int(os.environ.get("MOEBIUS_GEMV_SLAB", 16384))
WARPS = int(os.environ.get("MOEBIUS_GEMV_WARPS", 8))
# MOEBIUS_GEMV=0: cuBLAS for every projection (the A/B of the figures above)
ENABLED = os.environ.get("MOEBIUS_GEMV", "1") != "0"


@triton.jit
def _gemv_kernel(X, W, Y, T, N, K, stride_xt, stride_wn, stride_yt, Extra, YExtra, NE,
                 BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, BKE: tl.constexpr,
                 PDL: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    nmask, kmask = offs_n < N, offs_k < K
    w = tl.load(W + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :],
                mask=nmask[:, None] & kmask[None, :], other=0.0)
    if SPLIT:  # a 1/SPLIT piece of one of the NE extra rows (``gemv``'s ``extra``)
        row, offs_e = pid // SPLIT, (pid % SPLIT) * BKE + tl.arange(0, BKE)
        emask = (row < NE) & (offs_e < K)
        we = tl.load(Extra + row * K + offs_e, mask=emask, other=0.0)
    pdl_wait(PDL)  # the activations are the kernel before's output
    for t in range(T):
        x = tl.load(X + t * stride_xt + offs_k, mask=kmask, other=0.0).to(tl.float32)
        y = tl.sum(w.to(tl.float32) * x[None, :], 1)
        tl.store(Y + t * stride_yt + offs_n, y.to(Y.dtype.element_ty), mask=nmask)
        if SPLIT:
            xe = tl.load(X + t * stride_xt + offs_e, mask=emask, other=0.0).to(tl.float32)
            ye = tl.sum(we.to(tl.float32) * xe, 0)
            tl.store(YExtra + (t * SPLIT + pid % SPLIT) * NE + row, ye, mask=row < NE)


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """A few bf16 CUDA tokens against a weight whose rows are contiguous."""
    return (ENABLED and x.is_cuda and x.dtype == torch.bfloat16 == w.dtype
            and 0 < x.shape[0] <= MAX_TOKENS and x.stride(-1) == 1 and w.stride(1) == 1
            and w.shape[1] <= SLAB)


def gemv(x: torch.Tensor, w: torch.Tensor, extra: torch.Tensor | None = None):
    """x (T, K) @ w (N, K)ᵀ -> (T, N), float32 accumulation, rounded to x's dtype.

    ``extra`` (NE, K): also its rows' products, each split over SPLIT programs of the launch
    (SPLIT = programs // NE), as float32 partial sums (T, SPLIT, NE): the launch keeps its
    program count, so no more waves of programs than w alone takes (model/router_fold.py)."""
    T, K = x.shape
    N = w.shape[0]
    y = torch.empty(T, N, dtype=x.dtype, device=x.device)
    bk = triton.next_power_of_2(K)
    bn = max(1, SLAB // bk)
    programs = triton.cdiv(N, bn)
    split, ne, part = 0, 0, y  # no extra rows
    if extra is not None:
        ne = extra.shape[0]
        split = max(1, programs // ne)
        programs = max(programs, split * ne)
        assert extra.shape[1] == K and extra.is_contiguous()
        part = torch.empty(T, split, ne, dtype=torch.float32, device=x.device)
    _gemv_kernel[(programs,)](
        x, w, y, T, N, K, x.stride(0), w.stride(0), y.stride(0), extra if split else w, part, ne,
        BN=bn, BK=bk, SPLIT=split, BKE=triton.next_power_of_2(triton.cdiv(K, max(split, 1))),
        num_warps=WARPS, **launch_kw(),
    )
    return y if extra is None else (y, part)
