"""The residual add and the RMSNorm after it in one Triton launch (decode and prefill, CUDA).

Between two blocks of a layer the decoder does ``x = x + Σ_r parts[:, r]`` then ``h =
RMSNorm(x)``; eagerly that is a sum over the experts' K rows, an add and a norm (three
launches, the sum and the add each a full pass over memory). Here one program per token reads
its residual row and its R part rows once, writes the new residual and the normed row.

Rounding follows the eager bf16 ops it replaces (ops.add_rms_norm's reference): the R parts
summed in float32 and rounded, added to x and rounded (that is the new residual), then the
norm in float32, rounded, times the weight, rounded.

Shape legend: T tokens, R part rows a token, H hidden.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(
    X,
    Parts,
    W,
    Xout,
    Out,
    H,
    R,
    eps,
    stride_xt,
    stride_pt,
    stride_pr,
    stride_xo,
    stride_ot,
    HAS_PARTS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < H
    x = tl.load(X + t * stride_xt + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_PARTS:
        acc = tl.zeros([BLOCK_H], tl.float32)
        for r in range(R):
            acc += tl.load(Parts + t * stride_pt + r * stride_pr + offs, mask=mask,
                           other=0.0).to(tl.float32)
        s = acc.to(Xout.dtype.element_ty).to(tl.float32)
        x = (x + s).to(Xout.dtype.element_ty)
        tl.store(Xout + t * stride_xo + offs, x, mask=mask)
        x = x.to(tl.float32)
    var = tl.sum(x * x, 0) / H
    n = (x * tl.rsqrt(var + eps)).to(Out.dtype.element_ty).to(tl.float32)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + t * stride_ot + offs, (w * n).to(Out.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, parts: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(x + Σ_r parts[:, r], RMSNorm of that): x (T, H); parts (T, H), (T, R, H) or None (then
    x is returned as it is and only normed)."""
    T, H = x.shape
    out = torch.empty_like(x)
    if parts is not None and parts.dim() == 2:
        parts = parts.unsqueeze(1)
    xout = x if parts is None else torch.empty_like(x)
    if T == 0:
        return xout, out
    assert x.stride(1) == 1 and (parts is None or parts.stride(2) == 1)
    src = parts if parts is not None else x
    block = triton.next_power_of_2(H)
    _add_rms_norm_kernel[(T,)](
        x, src, weight, xout, out, H, 0 if parts is None else parts.shape[1], eps,
        x.stride(0), src.stride(0), src.stride(1) if parts is not None else 0,
        xout.stride(0), out.stride(0),
        HAS_PARTS=parts is not None, BLOCK_H=block, num_warps=4 if block <= 2048 else 8,
    )
    return xout, out
