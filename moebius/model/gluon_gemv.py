"""One decode token's projection with the whole weight held in shared memory, one wave.

The register GEMV (model/triton_gemv.py) streams its 32 KB slab before ``pdl_wait``, but two
programs an SM hold only 64 KB: q/k/v (21 MB, Qwen3-30B-A3B) is 640 programs, o (17 MB) 512,
so on 132 SMs only the first wave's ~8.4 MB is in flight before the wait and the rest is read
after it, on the critical path. Here each program owns ``ceil(N / SMs)`` rows (q/k/v 40 rows
× 2048, 160 KB; o 16 × 4096, 128 KB): one program an SM, all of them resident in one wave,
and the weight goes global -> shared memory by TMA (the copy engine: no registers, no
addresses), issued before the wait. After it only the activation row (L2), a read of shared
memory and the dot remain. Needs Hopper (TMA) and Gluon; rows that do not fit the shared
memory leave the projection to the register GEMV.

Off by default until a GPU run has timed it (docs/decisions.md): ``MOEBIUS_GEMV_SMEM=o``
turns it on for the o projection (after attention, whose kernels hold little shared memory,
so its programs can become resident early), ``=qkv`` for q/k/v (after the experts' down
kernel, whose pipelined tiles hold much of it), ``=1`` for both. Shape legend: K input
features, N outputs.
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
SMEM_SPARE = 64  # the mbarrier and alignment


@gluon.jit
def _gemv_smem_kernel(w_desc, X, Y, N, K, NR: gl.constexpr, NC: gl.constexpr, PDL: gl.constexpr):
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
    # The activation row, one L2 round trip while the boxes land: into shared memory, where
    # every row group reads it again.
    offs_k = gl.arange(0, NC * BC_, layout=gl.BlockedLayout([8], [32], [BR_], [0]))
    x_row = gl.allocate_shared_memory(X.dtype.element_ty, [NC * BC_],
                                      gl.SwizzledSharedLayout(1, 1, 1, [0]))
    x_row.store(gl.load(X + offs_k, mask=offs_k < K, other=0.0))
    gl.thread_barrier()
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [BR_, 1], [1, 0])
    offs_r = gl.arange(0, BR_, layout=gl.SliceLayout(1, layout))
    mbarrier.wait(bar, 0)
    for r in gl.static_range(NR):
        acc = gl.zeros([BR_, BC_], gl.float32, layout)
        for c in gl.static_range(NC):
            x = x_row.slice(c * BC_, BC_).load(gl.SliceLayout(0, layout))
            w = boxes.index(r * NC + c).load(layout)
            acc += w.to(gl.float32) * gl.expand_dims(x.to(gl.float32), 0)
        rows = row0 + r * BR_ + offs_r
        gl.store(Y + rows, gl.sum(acc, 1).to(Y.dtype.element_ty), mask=rows < N)
    mbarrier.invalidate(bar)


@functools.cache
def _device_limits(device: int) -> tuple[int, int]:
    """(multiprocessors, shared memory a program may opt into)."""
    props = triton.runtime.driver.active.utils.get_device_properties(device)
    return props["multiprocessor_count"], props["max_shared_mem"]


def shared_bytes(nr: int, k: int) -> int:
    """Shared memory of a program with ``nr`` row groups: its boxes, the activation row."""
    k_pad = triton.cdiv(k, BC) * BC
    return (nr * BR + 1) * k_pad * 2 + SMEM_SPARE


def plan(n: int, k: int, sms: int, max_shared: int) -> tuple[int, int] | None:
    """(row groups a program, programs) for an (n, k) bf16 weight: ``ceil(n / sms)`` rows
    rounded up to a whole box, or None when they do not fit the shared memory."""
    nr = triton.cdiv(triton.cdiv(n, sms), BR)
    if shared_bytes(nr, k) > max_shared:
        return None
    return nr, triton.cdiv(n, nr * BR)


def _hopper(x: torch.Tensor) -> bool:
    return torch.cuda.get_device_capability(x.device)[0] >= 9


def usable(x: torch.Tensor, w: torch.Tensor, projection: str) -> bool:
    """``projection`` ("qkv" or "o") is on, and this is one bf16 CUDA token on Hopper against
    a row-contiguous weight whose ``ceil(N / SMs)`` rows fit the shared memory (TMA needs
    16-byte aligned rows)."""
    if not (projection in PROJECTIONS and x.is_cuda and x.dtype == torch.bfloat16 == w.dtype
            and x.shape[0] == 1 and x.stride(-1) == 1 and w.stride(1) == 1
            and (w.stride(0) * 2) % 16 == 0 and w.data_ptr() % 16 == 0 and _hopper(x)):
        return False
    return plan(w.shape[0], w.shape[1], *_device_limits(x.device.index)) is not None


@functools.cache
def _box_layout():
    return gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (1, K) @ w (N, K)ᵀ -> (1, N), float32 accumulation, rounded to x's dtype."""
    K, N = x.shape[1], w.shape[0]
    nr, programs = plan(N, K, *_device_limits(x.device.index))
    desc = TensorDescriptor(w, list(w.shape), list(w.stride()), [BR, BC], _box_layout())
    y = torch.empty(1, N, dtype=x.dtype, device=x.device)
    _gemv_smem_kernel[(programs,)](desc, x, y, N, K, NR=nr, NC=triton.cdiv(K, BC),
                                   num_warps=WARPS, **launch_kw())
    return y
