"""One token at one rank: the add + norm + router launch between attention and the experts,
folded away (``MOEBIUS_FOLD_ROUTER=1``).

At batch 1 a layer is a chain of dependent launches, each costing its latency (wait release,
an L2 round trip, a store) while the weight stream idles (docs/persistent-decode.md); removing
a stage is what has paid (the top-k launch, session 10). This one removes the launch that adds
the attention output to the residual, norms it and computes the router logits.

RMSNorm is a positive scalar times a linear map: with x = x1 + o (residual plus attention
output) and r = 1/rms(x), router(norm(x)) = r · W_r·diag(w)·(x1 + o), and o = W_o·attn. So

    logits = r · (R·x1 + (R·W_o)·attn),   R = W_r·diag(w) (E, H),

and the top-k does not depend on r. The first share rides in the layer's *input* add + norm
launch, which already holds x1 (``router_res`` = R, on the new residual); the second, R·W_o
(rows H.. of ``o_route`` = [W_o; R·W_o], o_proj a view of its first H rows), rides in the o
GEMV: each of its programs also takes a 1/S piece of one of the E rows, float32 partials
(``SPLIT``; or, ``MOEBIUS_FOLD_SPLIT=0`` or with o's weight in shared memory
(``MOEBIUS_GEMV_SMEM=o``), as E more rows of the launch). The gate/up kernel
sums the shares, computes x = x1 + o, r and the normed row with the norm launch's roundings,
stores x (the next residual), picks and streams its expert's weights (triton_moe ``Fold``).
Cost: E·(nh·d + H) more weight elements a layer (Qwen3-30B-A3B: 1.5 MB, ~1% of a batch-1
layer's bytes). Status (session 15): untimed; docs/persistent-decode.md.

Rounding: the residual, the normed row and r are the ones the norm launch computes (r up to
its reduction order); the logits differ from router(normed row) by bf16 roundings of R and
R·W_o, so a near-tie in the top-k can resolve the other way (as between two
GEMM libraries); greedy tokens are checked against the unfolded path on the GPU.
"""

from __future__ import annotations

import os

import torch

from moebius.config import ModelConfig
from moebius.model.moe import routes_fused
from moebius.model.ops import project
from moebius.model.weights import ExpertStore, LayerWeights
from moebius.parallel.comm import Comm

try:  # Triton is there on GPU machines; the CPU path never needs it
    from moebius.model import triton_gemv, triton_moe
    from moebius.model.triton_norm import add_rms_norm_residual_logits
except ImportError:  # pragma: no cover - depends on the install
    triton_gemv = triton_moe = add_rms_norm_residual_logits = None
try:  # Gluon (Triton 3.5 and later)
    from moebius.model import gluon_gemv
except ImportError:  # pragma: no cover - depends on the install
    gluon_gemv = None

ENABLED = os.environ.get("MOEBIUS_FOLD_ROUTER", "0") == "1"
# The attention's share: "1" each o GEMV program also takes 1/SPLIT of one of the E rows of
# R·W_o (float32 partials, the launch keeps its 512 programs on Qwen3-30B-A3B); "0" E more
# rows of the o GEMV (544 programs: a third wave of two programs an SM on 132 SMs).
SPLIT = os.environ.get("MOEBIUS_FOLD_SPLIT", "1") != "0"


def prepare(lw: LayerWeights, cfg: ModelConfig, world_size: int, dtype, device) -> None:
    """Give an MoE layer of a one-rank bf16 CUDA model its folded router weights
    (``o_route``, ``router_res``; o_proj becomes a view), where ``ENABLED``."""
    if not (ENABLED and triton_moe is not None and world_size == 1
            and torch.device(device).type == "cuda" and dtype == torch.bfloat16
            and lw.router is not None and lw.router_bias is None and not lw.shared
            and lw.o_proj is not None and not cfg.is_mla):
        return
    H, E = cfg.hidden_size, cfg.num_experts
    o_route = torch.empty(H + E, lw.o_proj.shape[1], dtype=dtype, device=lw.o_proj.device)
    o_route[:H].copy_(lw.o_proj)
    lw.o_proj, lw.o_route = o_route[:H], o_route
    lw.router_res = torch.empty(E, H, dtype=dtype, device=o_route.device)
    refresh(lw)


def refresh(lw: LayerWeights) -> None:
    """Recompute a folded layer's derived rows (R·W_o and R = router·diag(post norm)) from its
    o_proj, router and post norm, in place (after ``prepare``, or a weight update)."""
    if lw.o_route is None:
        return
    res = lw.router.float() * lw.post_norm.float()
    lw.o_route[lw.o_proj.shape[0]:].copy_(res @ lw.o_proj.float())
    lw.router_res.copy_(res)


def o_projection(lw: LayerWeights):
    """The o projection of a folded layer: attention rows (1, nh·d) -> (o (1, H), the
    attention's share of the router logits: (1, S, E) float32 partials or (1, 1, E))."""
    H = lw.o_proj.shape[0]

    def project_o(x, o_w):
        if SPLIT and triton_gemv.usable(x, o_w) and not smem_o(x, lw.o_route):
            return triton_gemv.gemv(x, o_w, lw.o_route[H:])
        rows = project(x, lw.o_route, "o")  # [W_o; R·W_o] in shared memory where that is on
        return rows[:, :H], rows[:, None, H:]

    return project_o


def smem_o(x: torch.Tensor, o_route: torch.Tensor) -> bool:
    """The o projection holds its weight in shared memory (model/gluon_gemv.py,
    ``MOEBIUS_GEMV_SMEM=o``): then the share rides as E more rows of it (one wave either way:
    Qwen3-30B-A3B 24 rows a program, 91 programs), bf16 as ``SPLIT=0``'s."""
    return gluon_gemv is not None and gluon_gemv.usable(x, o_route, "o")


def applies(lw: LayerWeights, x: torch.Tensor, comm: Comm) -> bool:
    """The layer has folded weights and the step is one token the gate/up kernel routes."""
    return (lw.o_route is not None and x.shape[0] == 1 and routes_fused(x, comm)
            and triton_moe.SELF_ROUTE)


def input_norm(x, pending, lw: LayerWeights, eps: float):
    """The layer's input add + norm with the new residual's share of the router logits:
    (residual, normed row, share (1, E) float32)."""
    return add_rms_norm_residual_logits(x, pending, lw.input_norm, eps, lw.router_res)


def experts(x, attn, share, lw: LayerWeights, store: ExpertStore, cfg: ModelConfig):
    """The MoE block after attention, whose o projection gave ``attn`` (``o_projection``):
    (the next residual, the experts' (1, K, H) weighted rows, unsummed)."""
    o, o_share = attn
    routed = triton_moe.Routed(1, cfg.top_k, cfg.num_experts, x.dtype, x.device,
                               cfg.norm_topk_prob, logits=share)
    residual = torch.empty_like(x)
    w13, w2t = store.view(lw.moe_index)
    fold = triton_moe.Fold(o, o_share, lw.post_norm, cfg.rms_norm_eps, residual)
    return residual, triton_moe.experts_routed(x, routed, w13, w2t, fold=fold)
