"""The decoder forward pass shared by Qwen3-MoE and Mixtral (they differ only in q/k norm and
in top-k renormalisation, both read from the config), over one rank's weights and layout.

Shape legend: T tokens of this rank, H hidden, nh/kvh query/KV heads of this rank, d head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moebius.config import ModelConfig
from moebius.model.attention import AttentionMeta, paged_attention, write_kv
from moebius.model.moe import dense_mlp, moe_forward, norm_and_route, route, routes_fused
from moebius.model.ops import Rotary, add_rms_norm, project, rms_norm
from moebius.model.weights import LayerWeights, ModelWeights
from moebius.parallel.comm import Comm
from moebius.parallel.layout import Layout

try:  # Triton is there on GPU machines; the CPU path never needs it
    from moebius.model import triton_qk
except ImportError:  # pragma: no cover - depends on the install
    triton_qk = None
from moebius.model import router_fold


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
    project_o=None,
):
    """Self-attention. TP: this rank's head slice (views of the whole weights), o_proj
    row-parallel and all-reduced. EP (or one rank): all heads, one q/k/v GEMM, no
    communication. ``project_o``: a one-rank output projection that also gives the router's
    share (router_fold.py)."""
    d = cfg.head_dim
    qh, kvh = layout.q_heads(cfg), layout.kv_heads(cfg)
    q_w = lw.q_proj[qh.start * d : qh.stop * d]
    k_w = lw.k_proj[kvh.start * d : kvh.stop * d]
    v_w = lw.v_proj[kvh.start * d : kvh.stop * d]
    T = x.shape[0]
    if lw.qkv_proj is not None and len(qh) == cfg.num_heads and len(kvh) == cfg.num_kv_heads:
        qkv = project(x, lw.qkv_proj, "qkv")
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], -1)
        q, k, v = q.view(T, len(qh), d), k.view(T, len(kvh), d), v.view(T, len(kvh), d)
    else:  # a TP shard: this rank's head slices of the three views
        q = project(x, q_w, "qkv").view(T, len(qh), d)
        k = project(x, k_w, "qkv").view(T, len(kvh), d)
        v = project(x, v_w, "qkv").view(T, len(kvh), d)
    k_cache, v_cache = kv_cache
    if q.is_cuda and triton_qk is not None and triton_qk.supported(d):  # one launch for all
        q = triton_qk.qk_norm_rope_write(q, k, v, lw.q_norm, lw.k_norm, cfg.rms_norm_eps,
                                         rotary.cos, rotary.sin, positions, k_cache, v_cache,
                                         meta.slot_mapping)
    else:
        if lw.q_norm is not None:
            q = rms_norm(q, lw.q_norm, cfg.rms_norm_eps)
            k = rms_norm(k, lw.k_norm, cfg.rms_norm_eps)
        q, k = rotary.apply(q, positions), rotary.apply(k, positions)
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    o = paged_attention(q, k_cache, v_cache, meta, scale=d**-0.5)
    o_w = lw.o_proj[:, qh.start * d : qh.stop * d]
    o = o.reshape(T, -1)
    out = project_o(o, o_w) if project_o else project(o, o_w, "o")
    return comm.all_reduce(out) if layout.is_tp else out


def layer_forward(weights: ModelWeights, i: int, x, pending, cfg: ModelConfig, layout: Layout,
                  comm: Comm, rotary: Rotary, kv_pool, positions, meta: AttentionMeta,
                  num_tokens_max: int, expert_ids: list[torch.Tensor] | None = None):
    """Decoder layer ``i`` in ``layout`` on this rank's tokens: residual ``x`` (T, H) plus the
    previous layer's output ``pending`` (None, (T, H), or (T, K, H) unsummed expert rows), which
    is added in the same launch as the input norm. Returns (residual, this layer's output)."""
    lw = weights.layers[i]
    eps = cfg.rms_norm_eps
    fold = expert_ids is None and router_fold.applies(lw, x, comm)
    if fold:  # the norm + router launch after attention folded away (one token)
        x, h, share = router_fold.input_norm(x, pending, lw, eps)
    else:
        x, h = add_rms_norm(x, pending, lw.input_norm, eps)
    if x.shape[0]:
        h = attention_block(h, lw, i, cfg, layout, comm, rotary, positions,
                            kv_pool.view(i, layout), meta,
                            router_fold.o_projection(lw) if fold else None)
    if fold:
        return router_fold.experts(x, h, share, lw, weights.experts, cfg)
    if lw.router is None:
        x, h = add_rms_norm(x, h, lw.post_norm, eps)
        return x, dense_mlp(h, lw.dense, layout, comm)
    routed = None
    if routes_fused(x, comm):  # router, top-k and the experts' alignment in the norm's launch
        x, h, routed = norm_and_route(x, h, lw.post_norm, eps, lw.router, cfg)
    else:
        x, h = add_rms_norm(x, h, lw.post_norm, eps)
    w13, w2t = weights.experts.view(lw.moe_index)
    if expert_ids is not None:  # recomputes the small router GEMM, only when asked
        expert_ids.append(route(h, lw.router, cfg.top_k, cfg.norm_topk_prob)[0])
    return x, moe_forward(h, lw.router, w13, w2t, layout, comm, cfg, num_tokens_max, routed)


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
    x, pending = weights.embed[input_ids], None
    for i in range(len(weights.layers)):
        x, pending = layer_forward(weights, i, x, pending, cfg, layout, comm, rotary, kv_pool,
                                   positions, meta, num_tokens_max, expert_ids)
    return add_rms_norm(x, pending, weights.norm, cfg.rms_norm_eps)[1]


def forward_mixed(weights: ModelWeights, cfg: ModelConfig, modes: list[str], comm: Comm,
                  rotary: Rotary, kv_pool, tp: dict, ep: dict) -> tuple[torch.Tensor, str]:
    """A step whose layers are in different layouts (a progressive switch).

    ``tp`` holds the whole batch (ids, positions, meta, own_rows: this rank's tokens in it);
    ``ep`` this rank's own tokens (ids, positions, meta, t_max, gather: the flat index of each
    batch token in the all-gathered, padded per-rank tokens). Hidden states cross a TP->EP
    boundary by keeping this rank's rows, and an EP->TP boundary by an all-gather.
    Returns the final hidden states and the layout they are in.
    """
    rank, n = comm.rank, comm.world_size
    rep = modes[0]
    x, pending = weights.embed[(tp if rep == "tp" else ep)["ids"]], None
    for i in range(len(weights.layers)):
        if modes[i] != rep:
            if pending is not None:  # the residual crosses whole
                x, pending = x + pending, None
            if modes[i] == "ep":
                x = x[tp["own_rows"]]
            else:
                x = F.pad(x, (0, 0, 0, ep["t_max"] - x.shape[0]))
                x = comm.all_gather(x)[ep["gather"]]
            rep = modes[i]
        side = tp if rep == "tp" else ep
        x, pending = layer_forward(weights, i, x, pending, cfg, Layout(rep, rank, n), comm,
                                   rotary, kv_pool, side["positions"], side["meta"], ep["t_max"])
    return add_rms_norm(x, pending, weights.norm, cfg.rms_norm_eps)[1], rep
