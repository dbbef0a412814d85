"""Fused MoE experts for decode in Triton: three launches a layer, fixed shapes, graph-safe.

1. ``_align_kernel`` (one program): buckets the T·K (token, piece) pairs by piece, each
   bucket padded to a multiple of BM rows, and labels every BM-row block with its piece
   (-1: unused). Slots inside a bucket come from atomics; each row's result depends only on
   its own row, so the output is deterministic anyway.
2. ``_w13_kernel``: per (block, intermediate tile), gate and up GEMMs of the block's tokens
   against its piece's w13 rows, SiLU(gate)·up in the epilogue.
3. ``_w2_kernel``: per (block, hidden tile), the down GEMM, times the routing weight, stored
   at the pair's own row; the K rows of a token are summed afterwards (no atomics), at one
   rank inside the next residual add + norm (model/triton_norm.py). (A token-major variant
   summing each token's K pieces in one program was 2.3× slower at batch 1 on H200: its GEMV
   tiles read the weights far below bandwidth.)

At one rank and a few tokens, the router GEMM rides in the residual add + norm's launch and
the softmax/top-k in the alignment program (``route_align``); ``experts_routed`` runs the two
GEMMs on that plan. At one token there is nothing to align: block k is the token's k-th pick,
so each gate/up program computes the softmax/top-k from the logits itself and the alignment
launch goes (``SELF_ROUTE``; its (k, 0) programs store the ids and weights the down kernel
reads). Each small launch costs ~3 µs whatever it does, a few % of a ~60 µs batch-1 layer.

Only the pieces some token picked are read, each once per block. Against grouped GEMM plus
sort/scatter (moe.experts_grouped) it removes ~10 small launches a layer and reads weights at
a higher fraction of HBM bandwidth when each piece has a handful of rows, which is decode.
Shapes are bounded by T·K alone, so a CUDA graph captured at a batch size replays it.

Shape legend: T tokens, K pieces a token (top-k, or top-k·N under EP), M = T·K pairs,
P pieces, H hidden, c intermediate width of a piece, BM rows a block.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from moebius.model.triton_pdl import launch_kw, pdl_wait

MAX_PAIRS = 8192  # one alignment program holds all pairs; above this, grouped GEMM
BM = 16
ROUTE_FUSED_TOKENS = 16  # up to this many tokens, top-k and alignment share one program
# One token at one rank: the gate/up kernel picks the token's experts from the router's logits
# itself, with no top-k + alignment launch between (``Routed.one``): batch 1 3.28 -> 3.12 ms a
# step on H100 (session 10). MOEBIUS_SELF_ROUTE=0 keeps the launch.
SELF_ROUTE = os.environ.get("MOEBIUS_SELF_ROUTE", "1") != "0"
# There, the top-k on this many copies of the token's logits (one a warp of the gate/up
# program): 4 compiles to shuffles alone, 2 to 35 shared-memory barriers before the weights
# stream (sm_90 SASS, session 11). Timed in session 12 (H100): batch 1 2.98 ms with 4 against
# 3.00 with 2, within the run-to-run spread, so 2 stays.
TOPK_ROWS = int(os.environ.get("MOEBIUS_TOPK_ROWS", "2"))
# Tuning: "BN1,BK1,BN2,BK2" replaces ``_tiles`` up to 8 pairs (one token of Qwen3's top-8);
# "W1,S1,W2,S2" the gate/up and down kernels' warps and pipeline stages (default 4 each).
# Session 13 (H100, `bench.moe_kernels --one-sweep`): alone, 6 stages or a 32x256 gate/up tile
# on 2 warps took the pair 40.4 -> ~35 us, but end to end the best pair lost (batch 1 3.06 ->
# 3.13 ms): PDL already hides the ramp those shorten. Defaults kept.
def env_ints(name: str, default: str = "") -> tuple[int, ...] | None:
    """A "a,b,c,d" tuning variable as integers (None where unset and no default)."""
    text = os.environ.get(name, default)
    return tuple(int(v) for v in text.split(",")) if text else None


SMALL_TILES = env_ints("MOEBIUS_MOE_TILES_SMALL")
SMALL_LAUNCH = env_ints("MOEBIUS_MOE_LAUNCH_SMALL")


@triton.jit
def _align(ids, M, sorted_rows, block_piece, cursor, P: tl.constexpr, P_PAD: tl.constexpr,
           M_PAD: tl.constexpr, BM: tl.constexpr, NUM_BLOCKS: tl.constexpr, CHUNK: tl.constexpr):
    offs = tl.arange(0, M_PAD)
    valid = offs < M
    piece = tl.load(ids + offs, mask=valid, other=-1).to(tl.int32)
    held = valid & (piece >= 0)
    bucket = tl.where(held, piece, P)  # bin P collects pairs not held here
    counts = tl.histogram(bucket, P_PAD)
    bins = tl.arange(0, P_PAD)
    padded = tl.where(bins < P, (counts + BM - 1) // BM * BM, 0)
    ends = tl.cumsum(padded, 0)
    total = tl.sum(padded, 0)
    tl.store(cursor + bins, ends - padded)
    for b0 in range(0, NUM_BLOCKS * BM, CHUNK * BM):
        r = b0 + tl.arange(0, CHUNK * BM)
        tl.store(sorted_rows + r, M, mask=r < NUM_BLOCKS * BM)
    for b0 in range(0, NUM_BLOCKS, CHUNK):
        blk = b0 + tl.arange(0, CHUNK)
        first = blk * BM
        owner = tl.sum((ends[None, :] <= first[:, None]).to(tl.int32), 1)
        owner = tl.where(first < total, owner, -1)
        tl.store(block_piece + blk, owner, mask=blk < NUM_BLOCKS)
    tl.debug_barrier()  # cursor and sentinel stores land before the atomics and the scatter
    slot = tl.atomic_add(cursor + bucket, 1, mask=held)
    tl.store(sorted_rows + slot, offs, mask=held)


@triton.jit
def _align_kernel(ids, M, sorted_rows, block_piece, cursor, P: tl.constexpr, P_PAD: tl.constexpr,
                  M_PAD: tl.constexpr, BM: tl.constexpr, NUM_BLOCKS: tl.constexpr,
                  CHUNK: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    _align(ids, M, sorted_rows, block_piece, cursor, P, P_PAD, M_PAD, BM, NUM_BLOCKS, CHUNK)


@triton.jit
def _block_rows(pid_m, sorted_rows, block_piece, logits, ids, route_w, M, E, stride_lt,
                BM: tl.constexpr, ONE: tl.constexpr, PICK: tl.constexpr, K: tl.constexpr,
                K_PAD: tl.constexpr, E_PAD: tl.constexpr, RENORM: tl.constexpr,
                ROWS: tl.constexpr, folded, FOLD: tl.constexpr):
    """(piece, rows) of block pid_m: the piece it multiplies by (-1: none) and its BM pair
    indices (M: padding). ONE (one token, no alignment launch): block k is pair k alone; its
    piece is the token's k-th pick, computed here from the router's logits where PICK (the
    gate/up kernel, whose (k, 0) program stores pick k's id and weight for the down kernel),
    else read back from ``ids``. ROWS: copies of the logits the top-k runs on (``TOPK_ROWS``).
    FOLD: ``folded`` holds the logits (``_topk``)."""
    if ONE:
        rows = tl.where(tl.arange(0, BM) == 0, pid_m, M)
        if PICK:
            if ROWS == 2:
                offs_t = tl.arange(0, 2)  # the token and a masked row
            else:
                offs_t = tl.arange(0, ROWS) * 0  # ROWS copies of the token's logits
            picked_i, picked_w = _topk(logits, 1, E, stride_lt, offs_t, ROWS, K, K_PAD, E_PAD,
                                       RENORM, folded, FOLD)
            mine = (tl.arange(0, ROWS)[:, None] == 0) & (tl.arange(0, K_PAD)[None, :] == pid_m)
            piece = tl.sum(tl.sum(tl.where(mine, picked_i, 0), 1), 0)
            if tl.program_id(1) == 0:
                tl.store(ids + pid_m, piece)
                tl.store(route_w + pid_m, tl.sum(tl.sum(tl.where(mine, picked_w, 0.0), 1), 0)
                         .to(route_w.dtype.element_ty))
        else:
            piece = tl.load(ids + pid_m)
        piece = piece.to(tl.int32)
    else:
        piece = tl.load(block_piece + pid_m)
        rows = tl.load(sorted_rows + pid_m * BM + tl.arange(0, BM))
    return piece, rows


@triton.jit
def _w13_kernel(
    X,
    W,
    A,
    sorted_rows,
    block_piece,
    logits,
    ids,
    route_w,
    M,
    H,
    C,
    E,
    stride_xt,
    stride_we,
    stride_wn,
    stride_am,
    stride_lt,
    X_in,
    O,
    share,
    norm_w,
    Xres,
    eps,
    TOPK: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    ONE: tl.constexpr,
    K_PAD: tl.constexpr,
    E_PAD: tl.constexpr,
    RENORM: tl.constexpr,
    ROWS: tl.constexpr,
    FOLD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    SHARE_ROWS: tl.constexpr,
    PDL: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if FOLD:  # the norm's weight is no kernel's output: read before the wait
        wn = tl.load(norm_w + tl.arange(0, BLOCK_H), mask=tl.arange(0, BLOCK_H) < H,
                     other=0.0).to(tl.float32)
    pdl_wait(PDL)
    logits_all = 0.0
    if FOLD:  # X is where the normed row goes (router_fold.py)
        logits_all = _fold_norm(X_in, O, logits, share, wn, Xres, X, H, E, eps,
                                (pid_m == 0) & (pid_n == 0), ROWS, E_PAD, BLOCK_H, SHARE_ROWS)
    piece, rows = _block_rows(pid_m, sorted_rows, block_piece, logits, ids, route_w, M, E,
                              stride_lt, BM, ONE, True, TOPK, K_PAD, E_PAD, RENORM, ROWS,
                              logits_all, FOLD)
    if FOLD:
        tl.debug_barrier()  # the normed row this program stored is read back below
    if piece < 0:
        return
    rmask = rows < M
    tok = tl.where(rmask, rows // TOPK, 0)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < C
    w_base = W + piece.to(tl.int64) * stride_we
    acc_g = tl.zeros([BM, BN], tl.float32)
    acc_u = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, H, BK):
        offs_k = k0 + tl.arange(0, BK)
        kmask = offs_k < H
        x = tl.load(X + tok[:, None] * stride_xt + offs_k[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        wmask = nmask[:, None] & kmask[None, :]
        wg = tl.load(w_base + offs_n[:, None] * stride_wn + offs_k[None, :], mask=wmask, other=0.0)
        wu = tl.load(w_base + (C + offs_n)[:, None] * stride_wn + offs_k[None, :], mask=wmask,
                     other=0.0)
        acc_g += tl.dot(x, tl.trans(wg))
        acc_u += tl.dot(x, tl.trans(wu))
    g = acc_g.to(A.dtype.element_ty).to(tl.float32)  # round as a bf16 GEMM output would
    u = acc_u.to(A.dtype.element_ty).to(tl.float32)
    act = g * tl.sigmoid(g) * u
    out_rows = pid_m * BM + tl.arange(0, BM)
    tl.store(A + out_rows[:, None] * stride_am + offs_n[None, :], act.to(A.dtype.element_ty),
             mask=nmask[None, :])


@triton.jit
def _fold_norm(X_in, O, share_x, share_o, wn, Xres, Normed, H, E, eps, WRITE,
               ROWS: tl.constexpr, E_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
               SHARE_ROWS: tl.constexpr):
    """The add + norm before the experts, redone by every gate/up program of one token: the
    new residual X_in + O (rounded; stored where WRITE) and its normed row (stored by every
    program: the same values), rounded as the add + norm launch rounds them; returns the
    router logits (share_x + Σ share_o's SHARE_ROWS rows) · 1/rms, rounded, as (ROWS, E_PAD)
    float32 (-inf past E). Every load is issued before the first reduction."""
    offs = tl.arange(0, BLOCK_H)
    mask = offs < H
    offs_e = tl.arange(0, E_PAD)
    emask = (tl.arange(0, ROWS) == 0)[:, None] & (offs_e < E)[None, :]
    # volatile: issued in this order, the logits first (ptxas otherwise puts their loads after
    # the adds that use the rows, one more L2 round trip before the top-k)
    la = tl.load(share_x + offs_e[None, :] + tl.arange(0, ROWS)[:, None] * 0, mask=emask,
                 other=float("-inf"), volatile=True)
    lb = tl.zeros([ROWS, E_PAD], tl.float32)
    for s in tl.static_range(SHARE_ROWS):  # the attention's share: summed partials
        lb += tl.load(share_o + s * E + offs_e[None, :] + tl.arange(0, ROWS)[:, None] * 0,
                      mask=emask, other=0.0, volatile=True).to(tl.float32)
    x = (tl.load(X_in + offs, mask=mask, other=0.0, volatile=True).to(tl.float32)
         + tl.load(O + offs, mask=mask, other=0.0, volatile=True).to(tl.float32))
    x = x.to(Xres.dtype.element_ty)
    tl.store(Xres + offs, x, mask=mask & WRITE)
    x = x.to(tl.float32)
    scale = tl.rsqrt(tl.sum(x * x, 0) / H + eps)
    n = (x * scale).to(Normed.dtype.element_ty).to(tl.float32)
    tl.store(Normed + offs, (wn * n).to(Normed.dtype.element_ty), mask=mask)
    logits = (la.to(tl.float32) + lb) * scale
    return logits.to(Xres.dtype.element_ty).to(tl.float32)


@triton.jit
def _w2_kernel(
    A,
    W,
    Y,
    sorted_rows,
    block_piece,
    ids,
    route_w,
    M,
    H,
    C,
    stride_am,
    stride_we,
    stride_wk,
    stride_ym,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    ONE: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait(PDL)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    piece, rows = _block_rows(pid_m, sorted_rows, block_piece, route_w, ids, route_w, M, 0, 0,
                              BM, ONE, False, 1, 1, 1, False, 1, route_w, False)
    if piece < 0:
        return
    rmask = rows < M
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < H
    in_rows = pid_m * BM + tl.arange(0, BM)
    w_base = W + piece.to(tl.int64) * stride_we
    rw = tl.load(route_w + rows, mask=rmask, other=0.0).to(tl.float32)  # (not after the loop)
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, C, BK):
        offs_k = k0 + tl.arange(0, BK)
        kmask = offs_k < C
        a = tl.load(A + in_rows[:, None] * stride_am + offs_k[None, :], mask=kmask[None, :],
                    other=0.0)
        w = tl.load(w_base + offs_k[:, None] * stride_wk + offs_n[None, :],
                    mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc += tl.dot(a, w)
    y = acc.to(Y.dtype.element_ty).to(tl.float32) * rw[:, None]
    tl.store(Y + rows[:, None] * stride_ym + offs_n[None, :], y.to(Y.dtype.element_ty),
             mask=rmask[:, None] & nmask[None, :])


def _tiles(M: int) -> tuple[int, int, int, int]:
    """(BN, BK) of the w13 kernel and of the w2 kernel, by pair count (H200, Qwen3-30B-A3B
    shapes, ``python -m moebius.bench.moe_kernels``)."""
    if M <= 8 and SMALL_TILES:
        return SMALL_TILES
    if 8 < M <= 2048:
        return 64, 256, 128, 64
    return 64, 128, 64, 128


class _Plan:
    """The alignment's outputs for M pairs over P pieces in blocks of ``bm`` rows (see
    ``_align_kernel``; at prefill sizes triton_moe_large fills them)."""

    def __init__(self, M: int, P: int, dev, bm: int = BM) -> None:
        self.M, self.P, self.bm = M, P, bm
        self.num_blocks = triton.cdiv(M, bm) + min(P, M)
        self.sorted_rows = torch.empty(self.num_blocks * bm, dtype=torch.int32, device=dev)
        self.block_piece = torch.empty(self.num_blocks, dtype=torch.int32, device=dev)
        self.p_pad = triton.next_power_of_2(P + 1)
        self.cursor = torch.empty(self.p_pad, dtype=torch.int32, device=dev)

    def consts(self) -> dict:
        return dict(P=self.P, P_PAD=self.p_pad, M_PAD=max(16, triton.next_power_of_2(self.M)),
                    BM=self.bm, NUM_BLOCKS=self.num_blocks, CHUNK=32)


def experts_fused(x, pieces, weights, w13, w2t, tiles: tuple[int, int, int, int] | None = None,
                  reduce: bool = True):
    """Σ over each token's pieces of weight · expert(x), as ``moe.experts_reference``.

    x (T, H) bf16; pieces (T, K) long, -1 where not held; weights (T, K); w13 (P, 2c, H);
    w2t (P, c, H). Needs T·K <= MAX_PAIRS. ``tiles`` overrides ``_tiles`` (tuning).
    ``reduce=False``: every piece is held (one rank); the (T, K, H) weighted rows come back
    unsummed (each row written once, so no zero fill) for ``ops.add_rms_norm`` to sum.
    """
    T, K = pieces.shape
    M = T * K
    assert 0 < M <= MAX_PAIRS
    plan = _Plan(M, w13.shape[0], x.device)
    _align_kernel[(1,)](pieces.reshape(-1), M, plan.sorted_rows, plan.block_piece, plan.cursor,
                        **plan.consts(), num_warps=8, **launch_kw())
    return _run(x, plan, K, weights, w13, w2t, tiles, reduce)


class Routed:
    """One rank's routing of T tokens, computed with the norm before the block: router ``logits``
    (T, E), top-k ``ids`` (T, K), ``weights`` (T, K) and the alignment ``plan`` of the T·K
    pairs over every expert. ``one`` (one token, ``SELF_ROUTE``): the plan is left unfilled;
    the gate/up kernel picks the experts from the logits and fills ``ids`` and ``weights``.
    ``logits``: computed elsewhere (else allocated here, for the norm's launch to fill)."""

    def __init__(self, T: int, top_k: int, num_experts: int, dtype, dev,
                 renormalize: bool, logits: torch.Tensor | None = None) -> None:
        self.logits = (torch.empty(T, num_experts, dtype=dtype, device=dev) if logits is None
                       else logits)
        self.ids = torch.empty(T, top_k, dtype=torch.long, device=dev)
        self.weights = torch.empty(T, top_k, dtype=dtype, device=dev)
        self.plan = _Plan(T * top_k, num_experts, dev)
        self.renormalize = renormalize
        self.one = SELF_ROUTE and T == 1


def experts_routed(x, routed: Routed, w13, w2t, tiles=None, launch=None, fold=None):
    """The two expert GEMMs of tokens ``x`` on a ``Routed`` plan: the (T, K, H) weighted
    rows, unsummed (as ``reduce=False``). ``tiles``, ``launch``: as ``_run`` (tuning).
    ``fold`` (a ``Fold``, one token): ``x`` is the residual before the attention output is
    added, and ``routed.logits`` the residual's share of the logits (model/router_fold.py)."""
    assert routed.plan.M <= MAX_PAIRS and w13.shape[0] == routed.plan.P
    assert fold is None or routed.one
    return _run(x, routed.plan, routed.ids.shape[1], routed.weights, w13, w2t, tiles, False,
                routed if routed.one else None, launch=launch, fold=fold)


class Fold(NamedTuple):
    """What the gate/up kernel of one token needs to do the add + norm before it itself: the
    attention output ``o`` (1, H), its share of the router logits ``share`` (1, S, E): S
    partial rows, summed), the norm's weight and eps, and where the new residual goes
    (``residual`` (1, H))."""

    o: torch.Tensor
    share: torch.Tensor
    norm_w: torch.Tensor
    eps: float
    residual: torch.Tensor


def _run(x, plan: _Plan, K: int, weights, w13, w2t, tiles, reduce: bool, one=None,
         launch: tuple[int, int, int, int] | None = None, fold: Fold | None = None):
    """The gate/up and down GEMMs over an aligned plan, or over a one-token ``Routed`` ``one``
    whose experts the gate/up kernel picks; (T, H) summed or (T, K, H) rows. ``launch``:
    (warps, stages) of the gate/up and of the down kernel; default 4 and 4, up to 8 pairs
    ``SMALL_LAUNCH`` where set."""
    _, two_c, H = w13.shape
    c, M, T = two_c // 2, plan.M, plan.M // K
    assert x.stride(1) == 1 and w13.stride(2) == 1 and w2t.stride(2) == 1
    bn1, bk1, bn2, bk2 = tiles or _tiles(M)
    small = SMALL_LAUNCH if M <= 8 else None
    w1, s1, w2, s2 = launch or small or (4, 4, 4, 4)
    act = torch.empty(plan.num_blocks * plan.bm, c, dtype=x.dtype, device=x.device)
    route_w = weights.reshape(-1)
    blocks, logits, ids = plan.num_blocks, plan.block_piece, plan.block_piece  # unread unless one
    pick = dict(ONE=False, K_PAD=1, E_PAD=1, RENORM=False, ROWS=1)
    if one is not None:
        blocks, logits, ids = K, one.logits, one.ids
        pick = dict(ONE=True, K_PAD=triton.next_power_of_2(K),
                    E_PAD=triton.next_power_of_2(plan.P), RENORM=one.renormalize,
                    ROWS=TOPK_ROWS)
    x_in = x
    f = fold or Fold(x, x, x, 0.0, x)  # unread unless fold
    if fold is not None:  # the kernel norms x_in + o into x
        assert f.o.stride(-1) == 1 and f.share.dim() == 3
        assert f.share.shape[-2] == 1 or f.share.stride(-2) == plan.P
        assert f.share.stride(-1) == 1 and f.residual.is_contiguous()
        x = torch.empty_like(x_in)
    _w13_kernel[(blocks, triton.cdiv(c, bn1))](
        x, w13, act, plan.sorted_rows, plan.block_piece, logits, ids, route_w, M, H, c, plan.P,
        x.stride(0), w13.stride(0), w13.stride(1), act.stride(0), logits.stride(0),
        x_in, f.o, f.share, f.norm_w, f.residual, f.eps,
        TOPK=K, BM=plan.bm, BN=bn1, BK=bk1, **pick, FOLD=fold is not None,
        BLOCK_H=triton.next_power_of_2(H), SHARE_ROWS=f.share.shape[-2] if fold else 1,
        num_warps=w1, num_stages=s1, **launch_kw(),
    )
    # Rows of pieces not held here stay zero; with reduce=False every row is written.
    y = (torch.zeros if reduce else torch.empty)(M, H, dtype=x.dtype, device=x.device)
    _w2_kernel[(blocks, triton.cdiv(H, bn2))](
        act, w2t, y, plan.sorted_rows, plan.block_piece, ids, route_w, M, H, c,
        act.stride(0), w2t.stride(0), w2t.stride(1), y.stride(0),
        BM=plan.bm, BN=bn2, BK=bk2, ONE=pick["ONE"], num_warps=w2, num_stages=s2,
        **launch_kw(),
    )
    return y.view(T, K, H).sum(1) if reduce else y.view(T, K, H)


@triton.jit
def _topk(logits, T, E, stride_lt, offs_t, BT: tl.constexpr, K: tl.constexpr,
          K_PAD: tl.constexpr, E_PAD: tl.constexpr, RENORM: tl.constexpr, folded,
          FOLD: tl.constexpr):
    """Softmax over E, top K (ties: lowest index), optional renormalisation, for rows offs_t:
    (ids (BT, K_PAD) int64, weights (BT, K_PAD) float32; columns from K on are 0).
    FOLD: ``folded`` is the (BT, E_PAD) float32 logits themselves, already computed."""
    offs_e = tl.arange(0, E_PAD)
    if FOLD:
        x = folded
    else:
        x = tl.load(logits + offs_t[:, None] * stride_lt + offs_e[None, :],
                    mask=(offs_t < T)[:, None] & (offs_e[None, :] < E),
                    other=float("-inf")).to(tl.float32)
    x = x - tl.max(x, 1)[:, None]
    p = tl.exp(x)
    p = p / tl.sum(p, 1)[:, None]
    # One max a pick, not a max and an argmax: a probability's bits (a float >= 0) order as
    # integers; below them the reversed index, so equal probabilities go to the lowest index.
    key = (p.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (E_PAD - 1 - offs_e)[None, :]
    cols = tl.arange(0, K_PAD)
    picked_w = tl.zeros([BT, K_PAD], tl.float32)
    picked_i = tl.zeros([BT, K_PAD], tl.int64)
    for k in tl.static_range(K):
        best = tl.max(key, 1)
        w = (best >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        picked_w = tl.where(cols[None, :] == k, w[:, None], picked_w)
        picked_i = tl.where(cols[None, :] == k, (E_PAD - 1 - (best & 0xFFFFFFFF))[:, None],
                            picked_i)
        key = tl.where(key == best[:, None], -1, key)
    if RENORM:
        picked_w = picked_w / tl.sum(picked_w, 1)[:, None]
    return picked_i, picked_w


@triton.jit
def _topk_rows(logits, ids, weights, T, E, stride_lt, offs_t, BT: tl.constexpr,
               K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
               RENORM: tl.constexpr):
    """``_topk`` of rows offs_t, stored in ids and weights (T, K)."""
    picked_i, picked_w = _topk(logits, T, E, stride_lt, offs_t, BT, K, K_PAD, E_PAD, RENORM,
                               logits, False)
    cols = tl.arange(0, K_PAD)
    out = offs_t[:, None] * K + cols[None, :]
    omask = (offs_t < T)[:, None] & (cols[None, :] < K)
    tl.store(ids + out, picked_i, mask=omask)
    tl.store(weights + out, picked_w.to(weights.dtype.element_ty), mask=omask)


@triton.jit
def _topk_kernel(logits, ids, weights, T, E, stride_lt, K: tl.constexpr, K_PAD: tl.constexpr,
                 E_PAD: tl.constexpr, BT: tl.constexpr, RENORM: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    _topk_rows(logits, ids, weights, T, E, stride_lt, offs_t, BT, K, K_PAD, E_PAD, RENORM)


@triton.jit
def _route_align_kernel(logits, ids, weights, T, E, stride_lt, sorted_rows, block_piece, cursor,
                        K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
                        T_PAD: tl.constexpr, RENORM: tl.constexpr, P: tl.constexpr,
                        P_PAD: tl.constexpr, M_PAD: tl.constexpr, BM: tl.constexpr,
                        NUM_BLOCKS: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr):
    """Top-k of every token, then the alignment of its (token, expert) pairs: one program."""
    pdl_wait(PDL)
    _topk_rows(logits, ids, weights, T, E, stride_lt, tl.arange(0, T_PAD), T_PAD, K, K_PAD,
               E_PAD, RENORM)
    tl.debug_barrier()  # the ids just stored are read back as one flat vector
    _align(ids, T * K, sorted_rows, block_piece, cursor, P, P_PAD, M_PAD, BM, NUM_BLOCKS, CHUNK)


def route_align(routed: Routed, renormalize: bool) -> None:
    """Fill ``routed``'s ids, weights and plan from its logits, in one launch."""
    T, E = routed.logits.shape
    K, plan = routed.ids.shape[1], routed.plan
    _route_align_kernel[(1,)](
        routed.logits, routed.ids, routed.weights, T, E, routed.logits.stride(0),
        plan.sorted_rows, plan.block_piece, plan.cursor, K=K,
        K_PAD=triton.next_power_of_2(K), E_PAD=triton.next_power_of_2(E),
        T_PAD=max(2, triton.next_power_of_2(T)), RENORM=renormalize, **plan.consts(),
        num_warps=8, **launch_kw(),
    )


def route_topk(logits, top_k: int, renormalize: bool, dtype):
    """Softmax over experts, top-k, optional renormalisation, in one launch, as
    ``moe.route`` computes them: (ids (T, K) long, weights (T, K) in ``dtype``)."""
    T, E = logits.shape
    ids = torch.empty(T, top_k, dtype=torch.long, device=logits.device)
    weights = torch.empty(T, top_k, dtype=dtype, device=logits.device)
    if T:
        bt = 16
        _topk_kernel[(triton.cdiv(T, bt),)](
            logits, ids, weights, T, E, logits.stride(0),
            K=top_k, K_PAD=triton.next_power_of_2(top_k), E_PAD=triton.next_power_of_2(E),
            BT=bt, RENORM=renormalize, num_warps=4,
            **launch_kw(),
        )
    return ids, weights
