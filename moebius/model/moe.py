"""Mixture-of-experts: top-k routing and the experts' computation over one rank's expert
pieces, with the exchange each layout needs kept visible in ``moe_forward``.

Shape legend: T tokens, K top-k, E experts, P = E pieces per rank, H hidden, c = I/N.
A token routed to expert e uses, under TP, this rank's piece e; under EP (if e is local), the
N pieces s·E/N + (e - first) of its N shards. Since the down projection is linear in the
intermediate dimension, the sum over shards equals the whole expert.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from moebius.model.ops import ExpertRows, fused_on_cuda
from moebius.parallel.comm import Comm
from moebius.parallel.dispatch import dispatch_combine
from moebius.parallel.layout import Layout

try:  # Triton is there on GPU machines; the CPU path never needs it
    from moebius.model.triton_gated import silu_mul
    from moebius.model.triton_moe import (
        MAX_PAIRS,
        ROUTE_FUSED_TOKENS,
        experts_fused,
        experts_routed,
        route_topk,
    )
    from moebius.model.triton_moe_large import experts_fused_large
    from moebius.model.triton_norm import add_rms_norm_route
    from moebius.model.triton_sort import sort_pairs
except ImportError:  # pragma: no cover - depends on the install
    experts_fused = route_topk = add_rms_norm_route = silu_mul = sort_pairs = None
    experts_fused_large = None

# CUDA bf16 expert kernels: "auto" (fused Triton up to MAX_PAIRS token-piece pairs, which is
# decode; grouped GEMM for prefill-sized batches) or "grouped" (benchmarks, debugging).
MOE_KERNEL = os.environ.get("MOEBIUS_MOE", "auto")
# Above MAX_PAIRS: "auto" (triton_moe_large's fused kernels with prefill tiles, no row gather
# and no SiLU·up pass, up to LARGE_FUSED_MAX_PAIRS; grouped GEMM above), "fused" or "grouped".
# Session 12, one H100, Qwen3-30B-A3B prefill: 1 x 2048 (16,384 pairs) fused 46.4 ms against
# grouped 47.9; 16 x 512 in one step (65,536 pairs) fused 139.0 against 116.5 (CUTLASS's
# grouped GEMM runs at ~540 TFLOP/s there, our kernels at ~320). 2,048 tokens is the default
# max_num_batched_tokens, so a default engine's prefill chunks all take the fused kernels.
MOE_LARGE = os.environ.get("MOEBIUS_MOE_LARGE", "auto")
LARGE_FUSED_MAX_PAIRS = 16384


def route(x: torch.Tensor, router: torch.Tensor, top_k: int, renormalize: bool):
    """(topk_ids (T, K) long, topk_weights (T, K) in x's dtype), as transformers computes them;
    on CUDA the softmax/top-k/renormalisation is one Triton launch after the router GEMM."""
    if x.is_cuda and route_topk is not None:
        return route_topk(F.linear(x, router), top_k, renormalize, x.dtype)
    return _route_torch(x, router, top_k, renormalize)


@fused_on_cuda
def _route_torch(x: torch.Tensor, router: torch.Tensor, top_k: int, renormalize: bool):
    logits = F.linear(x, router)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights.to(x.dtype)


def piece_routing(ids, weights, layout: Layout, num_experts: int):
    """Map expert ids (T, K) to this rank's piece ids (T, K·chunks); -1 where not held."""
    if layout.is_tp or layout.world_size == 1:
        return ids, weights
    n, per = layout.world_size, num_experts // layout.world_size
    local = ids - layout.first_local_expert(num_experts)
    held = (local >= 0) & (local < per)
    shards = torch.arange(n, device=ids.device) * per  # (N,)
    pieces = torch.where(held[..., None], local[..., None] + shards, -1)  # (T, K, N)
    return pieces.flatten(1), weights[..., None].expand(-1, -1, n).flatten(1)


@fused_on_cuda
def _gated(h: torch.Tensor) -> torch.Tensor:
    c = h.shape[-1] // 2
    return F.silu(h[..., :c]) * h[..., c:]


def experts_reference(x, pieces, weights, w13, w2t):
    """Σ over each token's pieces: a loop over the pieces that have tokens (CPU, tests)."""
    out = torch.zeros_like(x)
    for p in torch.unique(pieces[pieces >= 0]).tolist():
        tok, kpos = torch.where(pieces == p)
        h = _gated(x[tok] @ w13[p].t()) @ w2t[p]
        out.index_add_(0, tok, h * weights[tok, kpos, None])
    return out


def experts_grouped(x, pieces, weights, w13, w2t, reduce: bool = True):
    """The same sum with one grouped GEMM per projection (CUDA, bf16): no loop over experts.
    ``reduce=False`` (every piece held: one rank): the rows come back as they leave the GEMMs,
    an ``ExpertRows`` the next ``ops.add_rms_norm`` weights, gathers and sums in its launch."""
    T, K = pieces.shape
    P = w13.shape[0]
    flat = torch.where(pieces >= 0, pieces, P).flatten()  # P: not held here, sorts last
    if sort_pairs is not None:  # a counting sort in 3 launches (the inverse with it)
        order, inv, offs = sort_pairs(flat, P)
    else:
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(P + 1, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))  # no host sync
        offs = torch.cumsum(counts[:P], 0, dtype=torch.int32)
        inv = torch.empty_like(order).index_copy_(0, order, torch.arange(T * K, device=x.device))
    tok = order // K
    h = torch._grouped_mm(x[tok], w13.transpose(1, 2), offs=offs)
    # (a Triton kernel: 2.3x torch.compile's at prefill sizes on H100, bit for bit)
    y = torch._grouped_mm(_gated(h) if silu_mul is None else silu_mul(h), w2t, offs=offs)
    if not reduce:  # every row written (all pieces held); pair i sits at row inv[i]
        return ExpertRows(y, inv.view(T, K), weights.contiguous())
    # Rows past offs[-1] were never written: select, do not multiply (garbage may be NaN).
    valid = (torch.arange(T * K, device=x.device) < offs[-1])[:, None]
    y = torch.where(valid, y * weights.flatten()[order][:, None], 0).to(x.dtype)
    # Back to (token, k) order with a plain gather (each row once), then sum over k:
    # far cheaper than an atomic index_add_ at prefill sizes, and deterministic.
    return y[inv].view(T, K, -1).sum(1)


def run_experts(x, pieces, weights, w13, w2t, reduce: bool = True):
    """Σ over each token's pieces of weight · expert(x): (T, H). With ``reduce=False`` (every
    piece held: one rank) the GPU paths may return their rows unsummed ((T, K, H) from the
    fused kernel, ``ExpertRows`` from grouped GEMM) for ``ops.add_rms_norm`` to sum with the
    residual add."""
    if not (x.is_cuda and x.dtype == torch.bfloat16) or pieces.numel() == 0:
        return experts_reference(x, pieces, weights, w13, w2t)
    fits = experts_fused is not None and pieces.numel() <= MAX_PAIRS
    if fits and MOE_KERNEL != "grouped":
        return experts_fused(x, pieces, weights, w13, w2t, reduce=reduce)
    large = MOE_LARGE == "fused" or (MOE_LARGE == "auto"
                                      and pieces.numel() <= LARGE_FUSED_MAX_PAIRS)
    if large and MOE_KERNEL != "grouped" and experts_fused_large is not None:
        return experts_fused_large(x, pieces, weights, w13, w2t, reduce=reduce)
    if hasattr(torch, "_grouped_mm"):
        return experts_grouped(x, pieces, weights, w13, w2t, reduce=reduce)
    return experts_reference(x, pieces, weights, w13, w2t)


def routes_fused(x, comm: Comm) -> bool:
    """One rank and a few bf16 CUDA tokens: the router GEMM, top-k and the experts'
    alignment ride in the norm before the block (``norm_and_route``)."""
    return (comm.world_size == 1 and experts_fused is not None and x.is_cuda
            and x.dtype == torch.bfloat16 and MOE_KERNEL != "grouped"
            and 0 < x.shape[0] <= ROUTE_FUSED_TOKENS)


def norm_and_route(x, parts, weight, eps: float, router, cfg):
    """Where ``routes_fused``: ``ops.add_rms_norm`` and the routing of the normed rows in one
    launch: (residual, normed rows, a ``triton_moe.Routed`` for ``moe_forward``)."""
    return add_rms_norm_route(x, parts, weight, eps, router, cfg.top_k, cfg.norm_topk_prob)


def moe_forward(x, router, w13, w2t, layout: Layout, comm: Comm, cfg, num_tokens_max: int,
                routed=None):
    """MoE block output for this rank's tokens ``x`` (T, H).

    TP: every rank holds every token and a 1/N slice of every expert: partial sums, all-reduce.
    EP: ranks hold different tokens and whole experts: ``ep_experts`` moves tokens to the
    experts' ranks and the outputs back. One rank: (T, H) or the unsummed (T, K, H) rows.
    ``routed``: the routing ``norm_and_route`` computed in the norm before (``routes_fused``).
    """
    if routed is not None:
        return experts_routed(x, routed, w13, w2t)
    ids, weights = route(x, router, cfg.top_k, cfg.norm_topk_prob)
    if comm.world_size == 1:
        return run_experts(x, ids, weights, w13, w2t, reduce=False)
    if layout.is_tp:
        out = run_experts(x, ids, weights, w13, w2t)
        return comm.all_reduce(out)
    return ep_experts(x, ids, weights, w13, w2t, layout, comm, cfg.num_experts, num_tokens_max)


def ep_experts(x, ids, weights, w13, w2t, layout: Layout, comm: Comm, num_experts: int,
               num_tokens_max: int):
    """EP: this rank's tokens x (T, H) through the experts of every rank, by the exchange
    ``comm.ep_exchange`` names (parallel/dispatch.py explains the choice)."""

    def local(rows, picks, w):
        pieces, pw = piece_routing(picks, w, layout, num_experts)
        return run_experts(rows, pieces, pw, w13, w2t)

    if comm.ep_exchange == "alltoall":
        return dispatch_combine(x, ids, weights, comm, num_experts, local)
    T = x.shape[0]
    pad = num_tokens_max - T
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
        ids = F.pad(ids, (0, 0, 0, pad), value=-1)
        weights = F.pad(weights, (0, 0, 0, pad))
    out = local(*comm.all_gather_rows([x, ids, weights]))  # one collective, not three
    return comm.reduce_scatter(out)[:T]


def dense_mlp(x, dense: dict, layout: Layout, comm: Comm):
    """A dense MLP layer: intermediate-sharded with all-reduce under TP, replicated under EP."""
    gate, up, down = dense["gate"], dense["up"], dense["down"]
    if layout.is_tp and comm.world_size > 1:
        c = gate.shape[0] // comm.world_size
        sl = slice(layout.rank * c, (layout.rank + 1) * c)
        h = F.silu(F.linear(x, gate[sl])) * F.linear(x, up[sl])
        return comm.all_reduce(F.linear(h, down[:, sl]))
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
