"""A few decode tokens' projection with the whole weight held in shared memory, one wave.

The register GEMV (model/triton_gemv.py) streams its 32 KB slab before ``pdl_wait``, but two
programs an SM hold only 64 KB: q/k/v (21 MB, Qwen3-30B-A3B) is 640 programs, o (17 MB) 512,
so on 132 SMs only the first wave's ~8.4 MB is in flight before the wait and the rest is read
after it, on the critical path. Here each program owns ``ceil(N / SMs)`` rows (q/k/v 40 rows
× 2048, 160 KB; o 16 × 4096, 128 KB): one program an SM, all of them resident in one wave,
and the weight goes global -> shared memory by TMA (the copy engine: no registers, no
addresses), issued before the wait. After it only the activation rows (L2), a read of shared
memory and the dots remain. Up to ``MAX_TOKENS`` tokens (a batch-2-8 decode step goes to cuBLAS
otherwise). Needs Hopper (TMA) and Gluon; rows that do not fit the shared memory leave the
projection to the register GEMV or cuBLAS.

Off by default until a GPU run has timed it (docs/decisions.md): ``MOEBIUS_GEMV_SMEM=o``
turns it on for the o projection (after attention, whose kernels hold little shared memory,
so its programs can become resident early), ``=qkv`` for q/k/v (after the experts' down
kernel, whose pipelined tiles hold much of it), ``=1`` for both. Shape legend: T tokens, K
input features, N outputs.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from moebius.model.triton_pdl import launch_kw

_CHOICE = os.environ.get("MOEBIUS_GEMV_SMEM", "0")
PROJECTIONS = {"1": {"qkv", "o"}, "qkv": {"qkv"}, "o": {"o"}}.get(_CHOICE, set())
BR = 8  # rows of one TMA box: one a warp
BC = 256  # columns of one TMA box (the most TMA takes unswizzled); a warp reads a row of it
WARPS = 8
# Tokens it takes: each weight tile is read from shared memory once and used for every token
# (an accumulator of 8 registers a token); the register GEMV stops at one (it ties cuBLAS at
# 2 and loses at 3-4), cuBLAS takes the rest. Untimed at any count (MOEBIUS_GEMV_SMEM_TOKENS).
MAX_TOKENS = int(os.environ.get("MOEBIUS_GEMV_SMEM_TOKENS", 8))
SMEM_SPARE = 64  # the mbarrier and alignment


@gluon.jit
def _gemv_smem_kernel(w_desc, X, Y, T, N, K, stride_xt, stride_yt, NR: gl.constexpr,
                      NC: gl.constexpr, TP: gl.constexpr, PDL: gl.constexpr):
    BR_: gl.constexpr = w_desc.block_type.shape[0]
    BC_: gl.constexpr = w_desc.block_type.shape[1]
    row0 = gl.program_id(0) * (NR * BR_)
    boxes = gl.allocate_shared_memory(w_desc.dtype, [NR * NC, BR_, BC_], w_desc.layout)
    bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(bar, count=1)
    mbarrier.expect(bar, NR * NC * w_desc.block_type.nbytes)
    for r in gl.static_range(NR):  # the weight is no kernel's output: fetched before the wait
        for c in gl.static_range(NC):
            tma.async_copy_global_to_shared(w_desc, [row0 + r * BR_, c * BC_], bar,
                                            boxes.index(r * NC + c))
    if PDL:  # the activations are the kernel before's output
        gdc_launch_dependents()
        gdc_wait()
    # The activation rows, one L2 round trip while the boxes land: into shared memory, where
    # every row group reads them again. TP: the tokens padded to a power of two.
    x_layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [1, BR_], [1, 0])
    offs_t = gl.arange(0, TP, layout=gl.SliceLayout(1, x_layout))
    offs_k = gl.arange(0, NC * BC_, layout=gl.SliceLayout(0, x_layout))
    xmask = (offs_t[:, None] < T) & (offs_k[None, :] < K)
    x_rows = gl.allocate_shared_memory(X.dtype.element_ty, [TP, NC * BC_],
                                       gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    x_rows.store(gl.load(X + offs_t[:, None] * stride_xt + offs_k[None, :], mask=xmask,
                         other=0.0))
    gl.thread_barrier()
    # (TP, BR, BC): tokens in registers, a warp a weight row, a thread 8 columns
    layout: gl.constexpr = gl.BlockedLayout([TP, 1, 8], [1, 1, 32], [1, BR_, 1], [2, 1, 0])
    w_layout: gl.constexpr = gl.SliceLayout(0, layout)
    out_layout: gl.constexpr = gl.SliceLayout(2, layout)
    offs_r = gl.arange(0, BR_, layout=gl.SliceLayout(0, out_layout))
    offs_to = gl.arange(0, TP, layout=gl.SliceLayout(1, out_layout))
    mbarrier.wait(bar, 0)
    for r in gl.static_range(NR):
        acc = gl.zeros([TP, BR_, BC_], gl.float32, layout)
        for c in gl.static_range(NC):
            x = x_rows.slice(c * BC_, BC_, dim=1).load(gl.SliceLayout(1, layout))
            w = boxes.index(r * NC + c).load(w_layout)
            acc += gl.expand_dims(w.to(gl.float32), 0) * gl.expand_dims(x.to(gl.float32), 1)
        rows = row0 + r * BR_ + offs_r
        y = gl.sum(acc, 2).to(Y.dtype.element_ty)
        gl.store(Y + offs_to[:, None] * stride_yt + rows[None, :], y,
                 mask=(offs_to[:, None] < T) & (rows[None, :] < N))
    mbarrier.invalidate(bar)


@functools.cache
def _device_limits(device: int) -> tuple[int, int]:
    """(multiprocessors, shared memory a program may opt into)."""
    props = triton.runtime.driver.active.utils.get_device_properties(device)
    return props["multiprocessor_count"], props["max_shared_mem"]


def shared_bytes(nr: int, k: int, t: int = 1) -> int:
    """Shared memory of a program with ``nr`` row groups and ``t`` tokens: its boxes, the
    activation rows."""
    k_pad = triton.cdiv(k, BC) * BC
    return (nr * BR + triton.next_power_of_2(t)) * k_pad * 2 + SMEM_SPARE


def plan(n: int, k: int, sms: int, max_shared: int, t: int = 1) -> tuple[int, int] | None:
    """(row groups a program, programs) for an (n, k) bf16 weight and ``t`` tokens:
    ``ceil(n / sms)`` rows rounded up to a whole box, or None when they do not fit the shared
    memory."""
    nr = triton.cdiv(triton.cdiv(n, sms), BR)
    if shared_bytes(nr, k, t) > max_shared:
        return None
    return nr, triton.cdiv(n, nr * BR)


def _hopper(x: torch.Tensor) -> bool:
    return torch.cuda.get_device_capability(x.device)[0] >= 9


def usable(x: torch.Tensor, w: torch.Tensor, projection: str) -> bool:
    """``projection`` ("qkv" or "o") is on, and these are at most ``MAX_TOKENS`` bf16 CUDA
    tokens on Hopper against a row-contiguous weight whose ``ceil(N / SMs)`` rows fit the
    shared memory (TMA needs 16-byte aligned rows)."""
    T = x.shape[0]
    if not (projection in PROJECTIONS and x.is_cuda and x.dtype == torch.bfloat16 == w.dtype
            and 0 < T <= MAX_TOKENS and x.stride(-1) == 1 and w.stride(1) == 1
            and (w.stride(0) * 2) % 16 == 0 and w.data_ptr() % 16 == 0 and _hopper(x)):
        return False
    return plan(w.shape[0], w.shape[1], *_device_limits(x.device.index), T) is not None


@functools.cache
def _box_layout():
    return gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (T, K) @ w (N, K)ᵀ -> (T, N), float32 accumulation, rounded to x's dtype."""
    (T, K), N = x.shape, w.shape[0]
    nr, programs = plan(N, K, *_device_limits(x.device.index), T)
    desc = TensorDescriptor(w, list(w.shape), list(w.stride()), [BR, BC], _box_layout())
    y = torch.empty(T, N, dtype=x.dtype, device=x.device)
    _gemv_smem_kernel[(programs,)](desc, x, y, T, N, K, x.stride(0), y.stride(0), NR=nr,
                                   NC=triton.cdiv(K, BC), TP=triton.next_power_of_2(T),
                                   num_warps=WARPS, **launch_kw())
    return y
