"""Per-head q/k RMSNorm (Qwen3), rotary embedding and the KV-cache write of one layer, in one
Triton launch: one program per (token, head) of q, k and v.

It replaces, per layer and step, two norm kernels, two rotary kernels and two index copies
(six launches of a few µs each, which is most of a decode step's cost at batch 1). The
arithmetic follows ops.rms_norm / ops.Rotary: the norm in float32, rounded to the model dtype
before the weight multiplies; cos/sin rounded to the model dtype; rotate-half convention.

Shape legend: T tokens, nh query heads, kvh KV heads, d head dim, P positions, NB blocks,
bs block size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moebius.model.triton_pdl import launch_kw, pdl_wait


@triton.jit
def _qk_kernel(
    Q,
    K,
    V,
    QO,
    KC,
    VC,
    q_norm,
    k_norm,
    cos,
    sin,
    positions,
    slots,
    eps,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_rp,
    NH: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    NORM: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait(PDL)
    t = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.arange(0, D)
    half = D // 2
    rot = (offs + half) % D
    sign = tl.where(offs < half, -1.0, 1.0)
    pos = tl.load(positions + t)
    c = tl.load(cos + pos * stride_rp + offs).to(QO.dtype.element_ty).to(tl.float32)
    s = tl.load(sin + pos * stride_rp + offs).to(QO.dtype.element_ty).to(tl.float32)
    is_q = h < NH
    if is_q:
        src = Q + t * stride_qt + h * stride_qh
        nw = q_norm
    else:
        src = K + t * stride_kt + (h - NH) * stride_kh
        nw = k_norm
    x = tl.load(src + offs).to(tl.float32)
    xr = tl.load(src + rot).to(tl.float32)
    if NORM:
        w = tl.load(nw + offs)
        wr = tl.load(nw + rot)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)
        x = (x * rstd).to(QO.dtype.element_ty).to(tl.float32) * w.to(tl.float32)
        xr = (xr * rstd).to(QO.dtype.element_ty).to(tl.float32) * wr.to(tl.float32)
        x = x.to(QO.dtype.element_ty).to(tl.float32)
        xr = xr.to(QO.dtype.element_ty).to(tl.float32)
    y = (x * c + sign * xr * s).to(QO.dtype.element_ty)
    if is_q:
        tl.store(QO + t * stride_ot + h * stride_oh + offs, y)
    else:
        slot = tl.load(slots + t)
        dst = (slot // BS) * stride_cb + (slot % BS) * stride_cs + (h - NH) * stride_ch
        tl.store(KC + dst + offs, y)
        v = tl.load(V + t * stride_vt + (h - NH) * stride_vh + offs)
        tl.store(VC + dst + offs, v)


def supported(head_dim: int) -> bool:
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def qk_norm_rope_write(q, k, v, q_norm, k_norm, eps: float, cos, sin, positions, k_cache,
                       v_cache, slot_mapping):
    """q (T, nh, d), k and v (T, kvh, d) (any row strides); q_norm/k_norm (d,) or None;
    cos/sin (P, d) float32. Writes k (normed, rotated) and v into the caches (NB, bs, kvh, d)
    at ``slot_mapping`` and returns q normed and rotated (T, nh, d)."""
    T, nh, d = q.shape
    kvh = k.shape[1]
    out = torch.empty(T, nh, d, dtype=q.dtype, device=q.device)
    if T == 0:
        return out
    assert q.stride(2) == k.stride(2) == v.stride(2) == k_cache.stride(3) == 1
    assert k_cache.stride() == v_cache.stride()
    norm = q_norm is not None
    _qk_kernel[(T, nh + kvh)](
        q, k, v, out, k_cache, v_cache,
        q_norm if norm else q, k_norm if norm else q,
        cos, sin, positions, slot_mapping, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), cos.stride(0),
        NH=nh, D=d, BS=k_cache.shape[1], NORM=norm, num_warps=1,
        **launch_kw(),
    )
    return out
