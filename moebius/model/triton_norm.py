"""The residual add and the RMSNorm after it in one Triton launch (decode and prefill, CUDA).

Between two blocks of a layer the decoder does ``x = x + Σ_r parts[:, r]`` then ``h =
RMSNorm(x)``; eagerly that is a sum over the experts' K rows, an add and a norm (three
launches, the sum and the add each a full pass over memory). Here one program per token reads
its residual row and its R part rows once, writes the new residual and the normed row.

Rounding follows the eager bf16 ops it replaces (ops.add_rms_norm's reference): the R parts
summed in float32 and rounded, added to x and rounded (that is the new residual), then the
norm in float32, rounded, times the weight, rounded.

Before an MoE block of a few tokens at one rank, the router GEMM rides in the same launch
(``add_rms_norm_route``): programs (token, BE experts) each redo the token's add + norm (a
few KB, from L2) and compute BE router logits; at batch 1 the router alone was a ~4 µs launch.
Top-k and the experts' alignment follow in one more launch (``triton_moe.route_align``); doing
them in this launch's last program (arrival counters) was measured no faster and dropped
(session 7; see triton_attention.py).

The parts may also come as the grouped experts' output rows in expert order with each
token's row index and routing weight (``ops.ExpertRows``, prefill at one rank): the gather
back to token order, the weighting and the sum over K then happen here too, instead of a
multiply, a scatter and a sum over the (T·K, H) rows each.

Shape legend: T tokens, R part rows a token, H hidden, E experts, M expert rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moebius.model.triton_moe import ROUTE_FUSED_TOKENS, Routed, route_align
from moebius.model.triton_pdl import launch_kw, pdl_wait


@triton.jit
def _add_norm_row(X, Parts, Index, RowW, w, Xout, Out, t, H, R, eps, stride_xt, stride_pt,
                  stride_pr, stride_xo, stride_ot, WRITE, HAS_PARTS: tl.constexpr,
                  GATHER: tl.constexpr, R_PAD: tl.constexpr, BLOCK_H: tl.constexpr):
    """Token t's new residual and normed row (float32 values of the rounded outputs); stores
    both where WRITE. GATHER: token t's part r is RowW[t, r] · Parts[Index[t, r]]. ``w``: the
    norm's weight (float32, loaded before the wait: after the sum's barrier it would be one
    more memory round trip)."""
    offs = tl.arange(0, BLOCK_H)
    mask = offs < H
    x = tl.load(X + t * stride_xt + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_PARTS:  # all R rows in one load (a loop would chain R memory round trips)
        offs_r = tl.arange(0, R_PAD)
        rmask = offs_r < R
        if GATHER:
            rows = tl.load(Index + t * R + offs_r, mask=rmask, other=0)
            p = tl.load(Parts + rows[:, None] * stride_pr + offs[None, :],
                        mask=rmask[:, None] & mask[None, :], other=0.0).to(tl.float32)
            rw = tl.load(RowW + t * R + offs_r, mask=rmask, other=0.0).to(tl.float32)
            p = (p * rw[:, None]).to(Xout.dtype.element_ty).to(tl.float32)  # as a bf16 product
        else:
            p = tl.load(Parts + t * stride_pt + offs_r[:, None] * stride_pr + offs[None, :],
                        mask=rmask[:, None] & mask[None, :], other=0.0).to(tl.float32)
        s = tl.sum(p, 0).to(Xout.dtype.element_ty).to(tl.float32)
        x = (x + s).to(Xout.dtype.element_ty)
        tl.store(Xout + t * stride_xo + offs, x, mask=mask & WRITE)
        x = x.to(tl.float32)
    var = tl.sum(x * x, 0) / H
    n = (x * tl.rsqrt(var + eps)).to(Out.dtype.element_ty).to(tl.float32)
    h = (w * n).to(Out.dtype.element_ty)
    tl.store(Out + t * stride_ot + offs, h, mask=mask & WRITE)
    return x, h.to(tl.float32)


@triton.jit
def _add_rms_norm_kernel(X, Parts, Index, RowW, W, Xout, Out, H, R, eps, stride_xt, stride_pt,
                         stride_pr, stride_xo, stride_ot, HAS_PARTS: tl.constexpr,
                         GATHER: tl.constexpr, R_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
                         PDL: tl.constexpr):
    offs = tl.arange(0, BLOCK_H)
    w = tl.load(W + offs, mask=offs < H, other=0.0).to(tl.float32)  # a weight: before the wait
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    _add_norm_row(X, Parts, Index, RowW, w, Xout, Out, t, H, R, eps, stride_xt, stride_pt,
                  stride_pr, stride_xo, stride_ot, True, HAS_PARTS, GATHER, R_PAD, BLOCK_H)


@triton.jit
def _add_rms_norm_route_kernel(X, Parts, Index, RowW, W, Xout, Out, Router, Logits, H, R, E, eps,
                               stride_xt, stride_pt, stride_pr, stride_xo, stride_ot, stride_re,
                               stride_lt, HAS_PARTS: tl.constexpr, GATHER: tl.constexpr,
                               R_PAD: tl.constexpr, BLOCK_H: tl.constexpr, BE: tl.constexpr,
                               ON_RESIDUAL: tl.constexpr, PDL: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    eb = tl.program_id(1)
    offs = tl.arange(0, BLOCK_H)
    offs_e = eb * BE + tl.arange(0, BE)
    emask = offs_e < E
    # The router's rows are no kernel's output: read them before waiting on the one before.
    r = tl.load(Router + offs_e[:, None] * stride_re + offs[None, :],
                mask=emask[:, None] & (offs[None, :] < H), other=0.0).to(tl.float32)
    w = tl.load(W + offs, mask=offs < H, other=0.0).to(tl.float32)
    pdl_wait(PDL)
    x, h = _add_norm_row(X, Parts, Index, RowW, w, Xout, Out, t, H, R, eps, stride_xt,
                         stride_pt, stride_pr, stride_xo, stride_ot, eb == 0, HAS_PARTS, GATHER,
                         R_PAD, BLOCK_H)
    if ON_RESIDUAL:  # the new residual's (unnormed) share of folded router logits, float32
        h = x
    logits = tl.sum(r * h[None, :], 1)  # rounded as a bf16 GEMM's output would be
    tl.store(Logits + t * stride_lt + offs_e, logits.to(Logits.dtype.element_ty), mask=emask)


def _launch(x, parts, weight, eps, router=None, top_k=0, renormalize=False,
            on_residual=False):
    T, H = x.shape
    out = torch.empty_like(x)
    gather = parts is not None and not isinstance(parts, torch.Tensor)  # ops.ExpertRows
    index = row_w = x  # placeholders, never read unless GATHER
    R = 0
    if gather:
        parts, index, row_w = parts.rows, parts.index, parts.weights
        R = index.shape[1]
        assert index.is_contiguous() and row_w.is_contiguous() and index.shape == row_w.shape
    elif parts is not None:
        parts = parts.unsqueeze(1) if parts.dim() == 2 else parts
        R = parts.shape[1]
    xout = x if parts is None else torch.empty_like(x)
    if router is None:
        routed = None
    elif on_residual:  # float32 logits, completed by the gate/up kernel (router_fold.py)
        routed = torch.empty(T, router.shape[0], dtype=torch.float32, device=x.device)
    else:
        routed = Routed(T, top_k, router.shape[0], x.dtype, x.device, renormalize)
    if T == 0:
        return xout, out, routed
    assert x.stride(1) == 1 and (parts is None or parts.stride(-1) == 1)
    src = parts if parts is not None else x
    r_pad = triton.next_power_of_2(max(R, 1))
    block = triton.next_power_of_2(H)
    args = (x, src, index, row_w, weight, xout, out)
    if gather:
        stride_pt, stride_pr = 0, src.stride(0)  # rows (M, H): row Index[t, r]
    elif parts is not None:
        stride_pt, stride_pr = src.stride(0), src.stride(1)
    else:
        stride_pt, stride_pr = src.stride(0), 0
    strides = (x.stride(0), stride_pt, stride_pr, xout.stride(0), out.stride(0))
    flags = dict(HAS_PARTS=parts is not None, GATHER=gather, R_PAD=r_pad, BLOCK_H=block)
    if router is None:
        _add_rms_norm_kernel[(T,)](
            *args, H, R, eps, *strides, **flags,
            num_warps=min(16, max(4, block * r_pad // 2048)),  # ~64 values a thread
            **launch_kw(),
        )
    else:
        E, be = router.shape[0], 8
        assert router.stride(1) == 1
        logits = routed if on_residual else routed.logits
        _add_rms_norm_route_kernel[(T, triton.cdiv(E, be))](
            *args, router, logits, H, R, E, eps, *strides, router.stride(0), logits.stride(0),
            **flags, BE=be, ON_RESIDUAL=on_residual,
            num_warps=min(16, max(8, block * max(r_pad, be) // 2048)), **launch_kw(),
        )
        if not on_residual and not routed.one:  # else the gate/up kernel picks the experts
            route_align(routed, renormalize)
    return xout, out, routed


def add_rms_norm(x: torch.Tensor, parts, weight: torch.Tensor, eps: float):
    """(x + Σ_r parts[:, r], RMSNorm of that): x (T, H); parts (T, H), (T, R, H), an
    ``ops.ExpertRows`` (gathered and weighted here) or None (x only normed)."""
    return _launch(x, parts, weight, eps)[:2]


def add_rms_norm_route(x, parts, weight, eps: float, router: torch.Tensor, top_k: int,
                       renormalize: bool):
    """``add_rms_norm`` plus the routing of the normed rows (T ≤ ROUTE_FUSED_TOKENS, every
    expert on this rank): a ``triton_moe.Routed`` (top-k ids, weights, the experts' plan)."""
    assert 0 < top_k and x.shape[0] <= ROUTE_FUSED_TOKENS
    return _launch(x, parts, weight, eps, router, top_k, renormalize)


def add_rms_norm_residual_logits(x, parts, weight, eps: float, router_res: torch.Tensor):
    """``add_rms_norm`` plus ``router_res`` (E, H) times the new *unnormed* residual: (residual,
    normed rows, (T, E) float32), the residual's share of router logits folded past the next
    norm (model/router_fold.py)."""
    assert router_res.stride(1) == 1
    return _launch(x, parts, weight, eps, router_res, on_residual=True)
