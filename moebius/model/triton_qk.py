"""Per-head q/k RMSNorm (Qwen3), rotary embedding and the KV-cache write of one layer, in one
Triton launch: one program per (block of tokens, head) of q, k and v; a block is one token
in decode, up to 32 in a prefill (``rows_per_program``).

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

from moebius.model.triton_pdl import launch_kw, pdl_launch_next, pdl_wait


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
    T,
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
    BT: tl.constexpr,
    EVEN: tl.constexpr,
    NORM: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_launch_next(PDL)
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    h = tl.program_id(1)
    tmask = (t < T) | EVEN  # EVEN: BT divides T, no masks (decode: a token a program)
    offs = tl.arange(0, D)
    half = D // 2
    rot = (offs + half) % D
    sign = tl.where(offs < half, -1.0, 1.0)
    # Before the wait: positions and slots (the host's), the rotary tables and norm weights
    # (no kernel's outputs); only q, k and v come from the kernel before.
    pos = tl.load(positions + t, mask=tmask, other=0)
    rope = pos[:, None] * stride_rp + offs[None, :]
    c = tl.load(cos + rope).to(QO.dtype.element_ty).to(tl.float32)
    s = tl.load(sin + rope).to(QO.dtype.element_ty).to(tl.float32)
    is_q = h < NH
    if is_q:
        src = Q + t[:, None] * stride_qt + h * stride_qh
        nw = q_norm
    else:
        src = K + t[:, None] * stride_kt + (h - NH) * stride_kh
        nw = k_norm
    if NORM:
        w = tl.load(nw + offs)[None, :].to(tl.float32)
        wr = tl.load(nw + rot)[None, :].to(tl.float32)
    slot = tl.load(slots + t, mask=tmask & ~is_q, other=0)
    pdl_wait(PDL)
    x = tl.load(src + offs[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
    xr = tl.load(src + rot[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
    # v with k (masked off for q heads), not after k's store: one round trip, not two
    v = tl.load(V + t[:, None] * stride_vt + (h - NH) * stride_vh + offs[None, :],
                mask=tmask[:, None] & ~is_q)
    if NORM:
        rstd = (1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps))[:, None]
        x = (x * rstd).to(QO.dtype.element_ty).to(tl.float32) * w
        xr = (xr * rstd).to(QO.dtype.element_ty).to(tl.float32) * wr
        x = x.to(QO.dtype.element_ty).to(tl.float32)
        xr = xr.to(QO.dtype.element_ty).to(tl.float32)
    y = (x * c + sign[None, :] * xr * s).to(QO.dtype.element_ty)
    if is_q:
        tl.store(QO + t[:, None] * stride_ot + h * stride_oh + offs[None, :], y,
                 mask=tmask[:, None])
    else:
        dst = ((slot // BS) * stride_cb + (slot % BS) * stride_cs)[:, None] \
            + (h - NH) * stride_ch + offs[None, :]
        tl.store(KC + dst, y, mask=tmask[:, None])
        tl.store(VC + dst, v, mask=tmask[:, None])


def rows_per_program(T: int) -> int:
    """Tokens a program takes: one while T tokens alone fill the GPU (decode), up to 32 for a
    prefill (one (token, head) a program made 8,192 tokens cost 355 µs a layer on H100)."""
    return min(32, triton.next_power_of_2(max(1, T // 512)))


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
    bt = rows_per_program(T)
    _qk_kernel[(triton.cdiv(T, bt), nh + kvh)](
        q, k, v, out, k_cache, v_cache,
        q_norm if norm else q, k_norm if norm else q,
        cos, sin, positions, slot_mapping, T, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), cos.stride(0),
        NH=nh, D=d, BS=k_cache.shape[1], BT=bt, EVEN=T % bt == 0, NORM=norm,
        num_warps=1 if bt == 1 else 4,
        **launch_kw(),
    )
    return out
