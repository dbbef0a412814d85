"""Multi-head latent attention (DeepSeek-V2/V3) over a paged latent KV pool.

Each token's keys and values are compressed into one latent: c = RMSNorm(x·W_DKV) of r values
plus a rope key k_pe of dr values shared by every head. The pool stores [c, k_pe] (r + dr
values per token per layer) as a single KV head (see kv/pool.py), so:

- TP: every rank computes the whole latent of every token and stores it (replicated); query
  heads are split, kv_b_proj's per-head rows and o_proj's columns are views of whole weights,
  and o_proj's partial sums are all-reduced.
- EP: each rank serves its own requests with all heads; no communication.

Attention runs in the latent space ("absorbed" weights, as DeepSeek serves it): per head,
q_nope·k_nope = (q_nope·W_UK)·c and the output is (softmax·c)·W_UVᵀ, so the pool is read as
one MQA head of r + dr values and the per-head keys and values are never materialised.

References: DeepSeek-V2 (arXiv 2405.04434) §2.1; transformers' deepseek_v2 / deepseek_v3.

Shape legend: T tokens, nh query heads of this rank, r kv_lora_rank, dr qk_rope_head_dim,
dn qk_nope_head_dim, dv v_head_dim, D = r + dr, H hidden, NB blocks, bs block size,
B decode sequences, S gathered context.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moebius.config import ModelConfig
from moebius.model.attention import AttentionMeta
from moebius.model.ops import rms_norm
from moebius.model.weights import LayerWeights
from moebius.parallel.comm import Comm
from moebius.parallel.layout import Layout

try:  # Triton is there on GPU machines; the CPU path never needs it
    from moebius.model import triton_mla
except ImportError:  # pragma: no cover - depends on the install
    triton_mla = None


# ---------------------------------------------------------------------- rope (YaRN)
def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq (dr/2,), cos/sin factor): plain rope, or YaRN as transformers computes it."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    y = dict(cfg.rope_scaling)
    if y.get("rope_type") != "yarn":
        return 1.0 / pos_freqs, 1.0
    orig = y["original_max_position_embeddings"]
    factor = y.get("factor") or cfg.max_position_embeddings / orig
    mscale, mscale_all = y.get("mscale"), y.get("mscale_all_dim")
    attn_factor = y.get("attention_factor")
    if attn_factor is None:
        attn_factor = (
            _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
            if mscale and mscale_all
            else _yarn_mscale(factor)
        )
    beta_fast, beta_slow = y.get("beta_fast") or 32, y.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if y.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attn_factor)


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(dn + dr), times YaRN's mscale(factor, mscale_all_dim)² when the config asks."""
    scale = cfg.qk_head_dim**-0.5
    y = dict(cfg.rope_scaling)
    if y.get("rope_type") == "yarn" and y.get("mscale_all_dim"):
        scale *= _yarn_mscale(y["factor"], y["mscale_all_dim"]) ** 2
    return scale


class MLARotary:
    """cos/sin tables (P, dr/2) for the decoupled rope dims, computed once in float32.

    DeepSeek's weights pair rope dims as (x0, x1), (x2, x3), ... (``rope_interleave``); the
    rotated output is written de-interleaved (evens then odds), as transformers' V3 does. The
    same permutation hits q_pe and k_pe, so their dot products are unchanged.
    """

    def __init__(self, cfg: ModelConfig, max_positions: int, device) -> None:
        inv_freq, factor = rope_inv_freq(cfg)
        pos = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)
        self.cos = (freqs.cos() * factor).to(device)
        self.sin = (freqs.sin() * factor).to(device)
        self.interleave = cfg.rope_interleave

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (T, n, dr) rotated by each token's position."""
        cos = self.cos[positions].to(x.dtype).unsqueeze(1)  # (T, 1, dr/2)
        sin = self.sin[positions].to(x.dtype).unsqueeze(1)
        if self.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# ---------------------------------------------------------------------- attention
def latent_attention(q, cache, meta: AttentionMeta, scale: float, r: int) -> torch.Tensor:
    """q (T, nh, D) in latent space -> (T, nh, r): MQA over the cached latents (NB, bs, 1, D),
    values = their first r entries (c). Latents of this step are already written."""
    T, nh, D = q.shape
    flat = cache.view(-1, D)
    kernel = q.is_cuda and triton_mla is not None and triton_mla.supported(r, D - r)
    if kernel and not meta.prefills and meta.decode_token_idx.numel() == T:  # decode only
        return triton_mla.paged_mla_decode(q, cache, meta.decode_block_tables,
                                           meta.decode_ctx_lens, scale, meta.decode_max_context, r)
    out = q.new_empty(T, nh, r)
    if meta.decode_token_idx.numel() and kernel:
        out[meta.decode_token_idx] = triton_mla.paged_mla_decode(
            q[meta.decode_token_idx], cache, meta.decode_block_tables, meta.decode_ctx_lens,
            scale, meta.decode_max_context, r)
    elif meta.decode_token_idx.numel():
        tables = meta.decode_block_tables
        B, nb = tables.shape
        bs = cache.shape[1]
        kv = cache[tables].view(B, 1, nb * bs, D)  # (B, 1, S, D)
        pos = torch.arange(nb * bs, device=q.device)
        mask = (pos[None, :] < meta.decode_ctx_lens[:, None])[:, None, None, :]
        qd = q[meta.decode_token_idx].unsqueeze(2)  # (B, nh, 1, D)
        o = F.scaled_dot_product_attention(
            qd, kv, kv[..., :r], attn_mask=mask, scale=scale, enable_gqa=True
        )
        out[meta.decode_token_idx] = o.squeeze(2)
    for c in meta.prefills:
        ctx = c.start_pos + c.num_tokens
        bs = cache.shape[1]
        slots = (c.block_table[:, None] * bs + torch.arange(bs, device=q.device)).flatten()
        kv = flat[slots[:ctx]][None]  # (1, S, D)
        qc = q[c.token_start : c.token_start + c.num_tokens].transpose(0, 1)  # (nh, t, D)
        qpos = c.start_pos + torch.arange(c.num_tokens, device=q.device)
        mask = torch.arange(ctx, device=q.device)[None, :] <= qpos[:, None]
        o = F.scaled_dot_product_attention(
            qc, kv, kv[..., :r], attn_mask=mask, scale=scale, enable_gqa=True
        )
        out[c.token_start : c.token_start + c.num_tokens] = o.transpose(0, 1)
    return out


def mla_block(
    x: torch.Tensor,
    lw: LayerWeights,
    cfg: ModelConfig,
    layout: Layout,
    comm: Comm,
    rotary: MLARotary,
    positions: torch.Tensor,
    cache: torch.Tensor,
    meta: AttentionMeta,
) -> torch.Tensor:
    """MLA self-attention of this rank's tokens x (T, H): write their latents into ``cache``
    at ``meta.slot_mapping``, attend, project. TP: this rank's heads, all-reduced."""
    w, eps = lw.mla, cfg.rms_norm_eps
    r, dr, dn, dv = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
    heads = layout.q_heads(cfg)
    nh, dq, T = len(heads), cfg.qk_head_dim, x.shape[0]
    rows = slice(heads.start * dq, heads.stop * dq)
    if cfg.q_lora_rank:
        q = rms_norm(F.linear(x, w["q_a_proj"]), w["q_a_layernorm"], eps)
        q = F.linear(q, w["q_b_proj"][rows])
    else:
        q = F.linear(x, w["q_proj"][rows])
    q_nope, q_pe = q.view(T, nh, dq).split([dn, dr], dim=-1)
    # the latent: whole on every rank that serves the token (replicated under TP)
    c, k_pe = F.linear(x, w["kv_a_proj_with_mqa"]).split([r, dr], dim=-1)
    c = rms_norm(c, w["kv_a_layernorm"], eps)
    k_pe = rotary.apply(k_pe.unsqueeze(1), positions).squeeze(1)
    cache.view(-1, r + dr).index_copy_(0, meta.slot_mapping, torch.cat([c, k_pe], dim=-1))
    # absorb W_UK into the queries, attend in latent space, then apply W_UV
    kv_b = w["kv_b_proj"].view(cfg.num_heads, dn + dv, r)[heads.start : heads.stop]
    w_uk, w_uv = kv_b[:, :dn], kv_b[:, dn:]  # (nh, dn, r), (nh, dv, r)
    q_lat = torch.einsum("tnd,ndr->tnr", q_nope, w_uk)
    qa = torch.cat([q_lat, rotary.apply(q_pe, positions)], dim=-1)  # (T, nh, D)
    o_lat = latent_attention(qa, cache, meta, softmax_scale(cfg), r)  # (T, nh, r)
    o = torch.einsum("tnr,nvr->tnv", o_lat, w_uv)  # (T, nh, dv)
    out = F.linear(o.reshape(T, nh * dv), lw.o_proj[:, heads.start * dv : heads.stop * dv])
    return comm.all_reduce(out) if layout.is_tp else out
