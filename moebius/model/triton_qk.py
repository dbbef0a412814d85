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
def norm_rope(src, nw, cos, sin, pos, eps, stride_rp, stride_r, offs_r, rmask, D: tl.constexpr,
              NORM: tl.constexpr, OUT: tl.constexpr):
    """Rows ``src + offs_r·stride_r`` (R, D) RMS-normed with weight ``nw`` (when NORM) and
    rotated to position ``pos``: float32 values of the ``OUT``-dtype results, rounded as the
    eager ops round (norm in float32, rounded before the weight multiplies; cos/sin rounded)."""
    offs = tl.arange(0, D)
    half = D // 2
    rot = (offs + half) % D
    sign = tl.where(offs < half, -1.0, 1.0)
    c = tl.load(cos + pos * stride_rp + offs).to(OUT).to(tl.float32)
    s = tl.load(sin + pos * stride_rp + offs).to(OUT).to(tl.float32)
    rows = src + offs_r[:, None] * stride_r
    x = tl.load(rows + offs[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    xr = tl.load(rows + rot[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    if NORM:
        w = tl.load(nw + offs).to(tl.float32)
        wr = tl.load(nw + rot).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)
        x = (x * rstd[:, None]).to(OUT).to(tl.float32) * w[None, :]
        xr = (xr * rstd[:, None]).to(OUT).to(tl.float32) * wr[None, :]
        x = x.to(OUT).to(tl.float32)
        xr = xr.to(OUT).to(tl.float32)
    return (x * c[None, :] + sign[None, :] * xr * s[None, :]).to(OUT).to(tl.float32)


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
    one = tl.arange(0, 1)
    pos = tl.load(positions + t)
    is_q = h < NH
    if is_q:
        y = norm_rope(Q + t * stride_qt + h * stride_qh, q_norm, cos, sin, pos, eps, stride_rp,
                      0, one, one < 1, D, NORM, QO.dtype.element_ty)
        tl.store(QO + t * stride_ot + h * stride_oh + offs[None, :], y.to(QO.dtype.element_ty))
    else:
        y = norm_rope(K + t * stride_kt + (h - NH) * stride_kh, k_norm, cos, sin, pos, eps,
                      stride_rp, 0, one, one < 1, D, NORM, QO.dtype.element_ty)
        slot = tl.load(slots + t)
        dst = (slot // BS) * stride_cb + (slot % BS) * stride_cs + (h - NH) * stride_ch
        tl.store(KC + dst + offs[None, :], y.to(KC.dtype.element_ty))
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
