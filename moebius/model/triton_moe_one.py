"""The routed experts of one decode token in one launch: top-k, gate/up, SiLU, down.

At batch 1 on one rank, after the norm's launch has computed the router logits, the experts
were three launches (top-k + alignment in one program; gate/up; down), each waiting for the
one before to drain and then ramping up from nothing: ~3 µs each of a ~70 µs layer beyond the
weights' bytes (H100, session 7: gate/up 19.8 µs against a 16.7 floor, down 11.7 against 8.3).
Here one persistent grid, as many programs as fit on the GPU at once, does it all:

1. every program computes the token's softmax top-k from the E logits itself (a few hundred
   bytes from L2, no launch, no alignment: unit (k, rows) reads expert ids[k]);
2. gate/up slabs of the K experts as GEMVs, SiLU(gate)·up stored to a scratch (K, c);
3. each program loads the first slab of its down work, then waits at a grid barrier
   (triton_barrier.py) for every program's activations, so HBM keeps streaming across the
   phase change instead of draining;
4. down slabs (expert k, BH hidden columns, c in chunks of CK rows), times the routing weight,
   stored as the unsummed (1, K, H) rows the next residual add + norm sums
   (as ``triton_moe``'s w2 kernel).

Each program keeps one slab in flight while it reduces the one before (two in registers).
Rounding follows triton_moe's kernels: gate, up and down rounded to the model dtype as a bf16
GEMM's outputs, the activation rounded, the routing weight applied to the rounded down row.

``PHASE`` 1 then 2 runs the halves as two launches: for Triton's interpreter (programs run one
after another, so a spin barrier never returns there) and for the A/B of the barrier
(``MOEBIUS_MOE_ONE=split``). ``MOEBIUS_MOE_ONE=1`` turns the one launch on; off (the three
launches of triton_moe) until a GPU run has timed it.

Shape legend: K top-k, E experts, P pieces, H hidden, c intermediate width, BR gate/up rows a
unit, BH down columns a unit, CK down rows a chunk.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moebius.model.triton_barrier import barrier_counters, grid_barrier, resident_programs
from moebius.model.triton_moe import topk_values
from moebius.model.triton_pdl import launch_kw, pdl_wait

# "1" one launch, "split" two, "0" off (the default until a GPU run has timed it: decisions.md)
MODE = os.environ.get("MOEBIUS_MOE_ONE", "0")
BR = int(os.environ.get("MOEBIUS_MOE_ONE_BR", 2))
BH = int(os.environ.get("MOEBIUS_MOE_ONE_BH", 64))
CK = int(os.environ.get("MOEBIUS_MOE_ONE_CK", 128))
WARPS = int(os.environ.get("MOEBIUS_MOE_ONE_WARPS", 8))
PER_SM = int(os.environ.get("MOEBIUS_MOE_ONE_PER_SM", 2))
# "rank": top-k by counting each expert's rank (up to 128 experts); "argmax": K rounds of argmax
TOPK = os.environ.get("MOEBIUS_MOE_ONE_TOPK", "rank")


@triton.jit
def _slab13(W13, e, r0, C, stride_wn, offs_r, offs_h, hmask, valid):
    """Gate rows r0..r0+BR and the matching up rows of expert e: two (BR, BLOCK_H) tiles."""
    base = W13 + e * stride_wn * 2 * C
    m = hmask[None, :] & valid
    g = tl.load(base + (r0 + offs_r)[:, None] * stride_wn + offs_h[None, :], mask=m, other=0.0)
    u = tl.load(base + (C + r0 + offs_r)[:, None] * stride_wn + offs_h[None, :], mask=m,
                other=0.0)
    return g, u


@triton.jit
def _slab2(W2T, e, c0, h0, C, stride_ve, stride_vc, offs_c, offs_b, valid):
    """Down rows c0..c0+CK (of c) of expert e at hidden columns h0..h0+BH: a (CK, BH) tile."""
    rows = c0 + offs_c
    return tl.load(W2T + e * stride_ve + rows[:, None] * stride_vc + (h0 + offs_b)[None, :],
                   mask=(rows < C)[:, None] & valid, other=0.0)


@triton.jit
def _pick(vec, cols, k):
    """vec[k] of a (K_PAD,) vector, k a run-time scalar."""
    return tl.sum(tl.where(cols == k, vec, 0), 0)


@triton.jit
def _topk_by_rank(Logits, E, K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
                  RENORM: tl.constexpr, CH: tl.constexpr):
    """``triton_moe.topk_values`` of one row with fewer reductions: each expert's rank (how many
    come before it: a higher probability, or an equal one at a lower index), CH experts at a
    time against all, and the K picks among them at once. Same ids and weights."""
    offs_e = tl.arange(0, E_PAD)
    x = tl.load(Logits + offs_e, mask=offs_e < E, other=float("-inf")).to(tl.float32)
    mx = tl.max(x, 0)
    total = tl.sum(tl.exp(x - mx), 0)
    p = tl.where(offs_e < E, tl.exp(x - mx) / total, -1.0)  # padding ranks last
    cols = tl.arange(0, K_PAD)
    ids = tl.zeros([K_PAD], tl.int32)
    w = tl.zeros([K_PAD], tl.float32)
    for i0 in tl.static_range(0, E_PAD, CH):
        offs_i = i0 + tl.arange(0, CH)
        xi = tl.load(Logits + offs_i, mask=offs_i < E, other=float("-inf")).to(tl.float32)
        pi = tl.where(offs_i < E, tl.exp(xi - mx) / total, -1.0)  # the same values as p's
        other = offs_e[None, :] != offs_i[:, None]  # never itself, whatever the rounding
        before = other & ((p[None, :] > pi[:, None]) | ((p[None, :] == pi[:, None])
                                                        & (offs_e[None, :] < offs_i[:, None])))
        rank = tl.sum(before.to(tl.int32), 1)  # (CH,)
        hit = (rank[None, :] == cols[:, None]) & (cols[:, None] < K)  # (K_PAD, CH)
        ids += tl.sum(tl.where(hit, offs_i[None, :], 0), 1)
        w += tl.sum(tl.where(hit, pi[None, :], 0.0), 1)
    if RENORM:
        w = w / tl.sum(w, 0)
    return ids.to(tl.int64), w


@triton.jit
def _one_token_kernel(X, Logits, Ids, Wts, W13, W2T, Act, Y, Bar, H, C, E, stride_ve,
                      stride_vc, stride_yk, K: tl.constexpr, K_PAD: tl.constexpr,
                      E_PAD: tl.constexpr, RENORM: tl.constexpr, NPROG: tl.constexpr,
                      BR: tl.constexpr, BLOCK_H: tl.constexpr, BH: tl.constexpr,
                      CK: tl.constexpr, TOPK_RANK: tl.constexpr, PHASE: tl.constexpr,
                      PDL: tl.constexpr):
    pid = tl.program_id(0)
    pdl_wait(PDL)
    if TOPK_RANK:
        ids, wts = _topk_by_rank(Logits, E, K, K_PAD, E_PAD, RENORM, 32)
    else:
        rows2 = tl.arange(0, 2)  # the token, and a masked row (Triton's smallest 2-D tile)
        ids2, wts2 = topk_values(Logits, 1, E, 0, rows2, 2, K, K_PAD, E_PAD, RENORM)
        ids = tl.sum(tl.where(rows2[:, None] == 0, ids2, 0), 0)
        wts = tl.sum(tl.where(rows2[:, None] == 0, wts2, 0.0), 0)
    wts = wts.to(Y.dtype.element_ty).to(tl.float32)  # stored in the model dtype, as top-k's
    cols = tl.arange(0, K_PAD)
    if pid == 0 and PHASE != 2:
        tl.store(Ids + cols, ids, mask=cols < K)
        tl.store(Wts + cols, wts.to(Wts.dtype.element_ty), mask=cols < K)
    stride_wn = H  # w13 rows are contiguous (checked on the host)

    if PHASE != 2:  # gate/up: units (k, BR rows), one slab in flight while one is reduced
        offs_h = tl.arange(0, BLOCK_H)
        hmask = offs_h < H
        offs_r = tl.arange(0, BR)
        x = tl.load(X + offs_h, mask=hmask, other=0.0).to(tl.float32)
        per_k = C // BR
        n1 = K * per_k
        u = pid
        g, up = _slab13(W13, _pick(ids, cols, u // per_k), (u % per_k) * BR, C, stride_wn,
                        offs_r, offs_h, hmask, u < n1)
        while u < n1:
            nxt = u + NPROG
            g_n, up_n = _slab13(W13, _pick(ids, cols, nxt // per_k), (nxt % per_k) * BR, C,
                                stride_wn, offs_r, offs_h, hmask, nxt < n1)
            gs = tl.sum(g.to(tl.float32) * x[None, :], 1).to(Act.dtype.element_ty)
            us = tl.sum(up.to(tl.float32) * x[None, :], 1).to(Act.dtype.element_ty)
            gs, us = gs.to(tl.float32), us.to(tl.float32)
            act = gs * tl.sigmoid(gs) * us
            tl.store(Act + (u // per_k) * C + (u % per_k) * BR + offs_r,
                     act.to(Act.dtype.element_ty))
            g, up, u = g_n, up_n, nxt

    if PHASE != 1:  # down: units (k, BH columns) of NC chunks of CK rows each
        offs_c = tl.arange(0, CK)
        offs_b = tl.arange(0, BH)
        per_k = H // BH
        n2 = K * per_k
        nc = tl.cdiv(C, CK)
        mine = tl.cdiv(tl.maximum(n2 - pid, 0), NPROG) * nc  # this program's chunks
        w = _slab2(W2T, _pick(ids, cols, pid // per_k), 0, (pid % per_k) * BH, C, stride_ve,
                   stride_vc, offs_c, offs_b, pid < n2)  # before the barrier: nobody writes it
        if PHASE == 0:
            grid_barrier(Bar, NPROG)
        acc = tl.zeros([BH], tl.float32)
        j = 0
        while j < mine:
            u = pid + (j // nc) * NPROG
            c0 = (j % nc) * CK
            nu = pid + ((j + 1) // nc) * NPROG
            w_n = _slab2(W2T, _pick(ids, cols, nu // per_k), ((j + 1) % nc) * CK,
                         (nu % per_k) * BH, C, stride_ve, stride_vc, offs_c, offs_b,
                         j + 1 < mine)
            k = u // per_k
            a = tl.load(Act + k * C + c0 + offs_c, mask=c0 + offs_c < C, other=0.0,
                        cache_modifier=".cg").to(tl.float32)
            acc += tl.sum(w.to(tl.float32) * a[:, None], 0)
            if j % nc == nc - 1:
                y = acc.to(Y.dtype.element_ty).to(tl.float32) * _pick(wts, cols, k)
                tl.store(Y + k * stride_yk + (u % per_k) * BH + offs_b, y.to(Y.dtype.element_ty))
                acc = tl.zeros([BH], tl.float32)
            w = w_n
            j += 1


def one_launch(T: int, H: int, c: int, dev: torch.device) -> bool:
    """One token on a CUDA device, with shapes the units tile exactly."""
    return (MODE != "0" and T == 1 and dev.type == "cuda" and c % BR == 0 and H % BH == 0)


def experts_one(x, logits, ids, weights, w13, w2t, renormalize: bool):
    """One token's top-k experts from its router ``logits`` (1, E): the (1, K, H) weighted
    rows, unsummed (as ``triton_moe.experts_routed``); fills ``ids`` (1, K) and ``weights``."""
    _, K = ids.shape
    P, two_c, H = w13.shape
    c, E = two_c // 2, logits.shape[1]
    assert x.shape == (1, H) and x.stride(1) == 1 and logits.stride(1) == 1
    assert w13.stride(1) == H and w13.stride(2) == 1 and w2t.stride(2) == 1
    assert w13.stride(0) == two_c * H
    act = torch.empty(K, c, dtype=x.dtype, device=x.device)
    y = torch.empty(1, K, H, dtype=x.dtype, device=x.device)
    consts = dict(K=K, K_PAD=triton.next_power_of_2(K), E_PAD=triton.next_power_of_2(E),
                  RENORM=renormalize, BR=BR, BLOCK_H=triton.next_power_of_2(H), BH=BH, CK=CK,
                  TOPK_RANK=TOPK == "rank" and E <= 128)
    args = (x, logits, ids, weights, w13, w2t, act, y)
    tail = (H, c, E, w2t.stride(0), w2t.stride(1), y.stride(1))
    if MODE == "split" or not x.is_cuda:
        for phase, units in ((1, K * c // BR), (2, K * H // BH)):
            n = units if x.is_cuda else 3  # any count is right; the interpreter loops
            _one_token_kernel[(n,)](*args, x, *tail, **consts, NPROG=n, PHASE=phase,
                                    num_warps=WARPS, **launch_kw())
        return y
    bar = barrier_counters(x.device, "moe_one")
    n = _checked_programs(x.device, args, bar, tail, consts)
    _one_token_kernel[(n,)](*args, bar, *tail, **consts, NPROG=n, PHASE=0, num_warps=WARPS,
                            **launch_kw())
    return y


_CHECKED: dict[tuple, int] = {}


def _checked_programs(device, args, bar, tail, consts) -> int:
    """PER_SM programs an SM, after checking on the compiled kernel that they all fit at once
    (a barrier with a program not resident never returns)."""
    key = (device.index, PER_SM, WARPS, tuple(sorted(consts.items())))
    if key not in _CHECKED:
        n = torch.cuda.get_device_properties(device).multi_processor_count * PER_SM
        kernel = _one_token_kernel.warmup(*args, bar, *tail, **consts, NPROG=n, PHASE=0,
                                          num_warps=WARPS, grid=(n,), **launch_kw())
        fit = resident_programs(kernel, WARPS, device)
        assert n <= fit, f"moe_one: {n} programs but only {fit} fit at once"
        _CHECKED[key] = n
    return _CHECKED[key]
