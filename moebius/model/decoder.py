"""The decoder forward pass shared by Qwen3-MoE and Mixtral (they differ only in q/k norm and
in top-k renormalisation, both read from the config), over one rank's weights and layout.

Shape legend: T tokens of this rank, H hidden, nh/kvh query/KV heads of this rank, d head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moebius.config import ModelConfig
from moebius.model.attention import AttentionMeta, paged_attention, write_kv
from moebius.model.moe import dense_mlp, moe_forward, route
from moebius.model.ops import Rotary, rms_norm
from moebius.model.weights import LayerWeights, ModelWeights
from moebius.parallel.comm import Comm
from moebius.parallel.layout import Layout


def attention_block(
    x,
    lw: LayerWeights,
    layer: int,
    cfg: ModelConfig,
    layout: Layout,
    comm: Comm,
    rotary: Rotary,
    positions,
    kv_cache,
    meta: AttentionMeta,
):
    """Self-attention. TP: this rank's head slice (views of the whole weights), o_proj
    row-parallel and all-reduced. EP: all heads, no communication."""
    d = cfg.head_dim
    qh, kvh = layout.q_heads(cfg), layout.kv_heads(cfg)
    q_w = lw.q_proj[qh.start * d : qh.stop * d]
    k_w = lw.k_proj[kvh.start * d : kvh.stop * d]
    v_w = lw.v_proj[kvh.start * d : kvh.stop * d]
    T = x.shape[0]
    q = F.linear(x, q_w).view(T, len(qh), d)
    k = F.linear(x, k_w).view(T, len(kvh), d)
    v = F.linear(x, v_w).view(T, len(kvh), d)
    if lw.q_norm is not None:
        q = rms_norm(q, lw.q_norm, cfg.rms_norm_eps)
        k = rms_norm(k, lw.k_norm, cfg.rms_norm_eps)
    q, k = rotary.apply(q, positions), rotary.apply(k, positions)
    k_cache, v_cache = kv_cache
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    o = paged_attention(q, k_cache, v_cache, meta, scale=d**-0.5)
    o_w = lw.o_proj[:, qh.start * d : qh.stop * d]
    out = F.linear(o.reshape(T, -1), o_w)
    return comm.all_reduce(out) if layout.is_tp else out


def forward(
    weights: ModelWeights,
    cfg: ModelConfig,
    layout: Layout,
    comm: Comm,
    rotary: Rotary,
    kv_pool,
    input_ids,
    positions,
    meta: AttentionMeta,
    num_tokens_max: int,
    expert_ids: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Final hidden states (T, H) of this rank's tokens (normalised). With ``expert_ids`` (a
    list), each MoE layer appends its routing's top-k expert ids (T, k) of these tokens."""
    x = weights.embed[input_ids]
    for i, lw in enumerate(weights.layers):
        h = rms_norm(x, lw.input_norm, cfg.rms_norm_eps)
        if x.shape[0]:
            h = attention_block(
                h, lw, i, cfg, layout, comm, rotary, positions, kv_pool.view(i, layout), meta
            )
        x = x + h
        h = rms_norm(x, lw.post_norm, cfg.rms_norm_eps)
        if lw.router is None:
            h = dense_mlp(h, lw.dense, layout, comm)
        else:
            w13, w2t = weights.experts.view(lw.moe_index)
            if expert_ids is not None:  # recomputes the small router GEMM, only when asked
                expert_ids.append(route(h, lw.router, cfg.top_k, cfg.norm_topk_prob)[0])
            h = moe_forward(h, lw.router, w13, w2t, layout, comm, cfg, num_tokens_max)
        x = x + h
    return rms_norm(x, weights.norm, cfg.rms_norm_eps)
