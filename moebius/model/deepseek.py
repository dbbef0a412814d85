"""The decoder forward pass of DeepSeek-V2/V3 over one rank's weights and layout: MLA attention
(model/mla.py), then a dense MLP (the first ``first_k_dense_replace`` layers) or an MoE block
of routed experts plus shared experts.

Routing, as transformers computes it (in float32):
- V2: softmax scores; ``greedy`` top-k, or ``group_limited_greedy`` (keep the top-k_group
  groups by their best score, zero the rest, top-k);
- V3 (``noaux_tc``): sigmoid scores; choose with scores + e_score_correction_bias, groups
  ranked by the sum of their top-2, weights from the unbiased scores, renormalised;
then times ``routed_scaling_factor``.

Routed experts use the shared expert store and pieces (same per-expert gate/up/down), so the
TP<->EP swap is unchanged. Shared experts: intermediate-sharded under TP, their partial sums
folded into the routed experts' all-reduce (no extra collective, 1/N of their weight reads);
replicated under EP, each rank applying them to its own tokens.

Shape legend: T tokens of this rank, K top-k, E routed experts, G groups, H hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moebius.config import ModelConfig
from moebius.model.attention import AttentionMeta
from moebius.model.mla import MLARotary, mla_block
from moebius.model.moe import dense_mlp, ep_experts, run_experts
from moebius.model.ops import add_rms_norm
from moebius.model.weights import LayerWeights, ModelWeights
from moebius.parallel.comm import Comm
from moebius.parallel.layout import Layout


def route(x: torch.Tensor, lw: LayerWeights, cfg: ModelConfig):
    """(topk_ids (T, K) long, topk_weights (T, K) in x's dtype)."""
    logits = F.linear(x.float(), lw.router.float())  # (T, E)
    E, G = cfg.num_experts, cfg.num_expert_groups
    if cfg.scoring_func == "sigmoid":
        scores = logits.sigmoid()
        choice = scores + lw.router_bias
        group_scores = choice.view(-1, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)  # (T, G)
        fill = float("-inf")
    else:
        scores = logits.softmax(dim=-1)
        choice = scores
        group_scores = scores.view(-1, G, E // G).max(dim=-1).values
        fill = 0.0
    if cfg.topk_method != "greedy":
        group_idx = torch.topk(group_scores, k=cfg.topk_group, dim=-1, sorted=False)[1]
        keep = torch.zeros_like(group_scores).scatter_(1, group_idx, 1).bool()  # (T, G)
        keep = keep.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E)
        choice = choice.masked_fill(~keep, fill)
    ids = torch.topk(choice, k=cfg.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids) if cfg.scoring_func == "sigmoid" else choice.gather(1, ids)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, (weights * cfg.routed_scaling_factor).to(x.dtype)


def shared_experts(x: torch.Tensor, shared: dict, layout: Layout, comm: Comm) -> torch.Tensor:
    """Shared experts' output: under TP this rank's intermediate slice (a partial sum, reduced
    with the routed experts), under EP whole."""
    gate, up, down = shared["gate"], shared["up"], shared["down"]
    if layout.is_tp and comm.world_size > 1:
        c = gate.shape[0] // comm.world_size
        sl = slice(layout.rank * c, (layout.rank + 1) * c)
        gate, up, down = gate[sl], up[sl], down[:, sl]
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def moe_block(x, ids, weights, lw: LayerWeights, w13, w2t, layout: Layout, comm: Comm, cfg, t_max):
    """Routed + shared experts for this rank's tokens x (T, H), routed to ``ids`` (T, K) with
    ``weights``. TP: partial sums of both, one all-reduce. EP: the routed experts through
    ``moe.ep_experts`` (the configured exchange), then the local shared experts."""
    if layout.is_tp or comm.world_size == 1:
        out = run_experts(x, ids, weights, w13, w2t)
        if lw.shared:
            out = out + shared_experts(x, lw.shared, layout, comm)
        return comm.all_reduce(out)
    out = ep_experts(x, ids, weights, w13, w2t, layout, comm, cfg.num_experts, t_max)
    return out + shared_experts(x, lw.shared, layout, comm) if lw.shared else out


def forward(
    weights: ModelWeights,
    cfg: ModelConfig,
    layout: Layout,
    comm: Comm,
    rotary: MLARotary,
    kv_pool,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    meta: AttentionMeta,
    num_tokens_max: int,
    expert_ids: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Final hidden states (T, H) of this rank's tokens (normalised); the same signature as
    model/decoder.py's ``forward``. With ``expert_ids`` (a list), each MoE layer appends its
    routed top-k expert ids (T, K) of these tokens (shared experts are not counted)."""
    x, h, eps = weights.embed[input_ids], None, cfg.rms_norm_eps
    for i, lw in enumerate(weights.layers):
        x, h = add_rms_norm(x, h, lw.input_norm, eps)  # h: the previous layer's output
        if x.shape[0]:
            (cache,) = kv_pool.view(i, layout)
            h = mla_block(h, lw, cfg, layout, comm, rotary, positions, cache, meta)
        x, h = add_rms_norm(x, h, lw.post_norm, eps)
        if lw.router is None:
            h = dense_mlp(h, lw.dense, layout, comm)
        else:
            w13, w2t = weights.experts.view(lw.moe_index)
            ids, topk_weights = route(h, lw, cfg)
            if expert_ids is not None:
                expert_ids.append(ids)
            h = moe_block(h, ids, topk_weights, lw, w13, w2t, layout, comm, cfg, num_tokens_max)
    return add_rms_norm(x, h, weights.norm, eps)[1]
