"""SiLU(gate)·up of the grouped-GEMM rows of a prefill, in Triton: (M, 2c) -> (M, c).

torch.compile's kernel for it (dynamic shapes) moved 1.2 TB/s on H100; this one 2.6-2.8 TB/s
(65,536 rows, 16 × 512 prompt tokens: 242 -> 107 µs a layer; BENCHMARKS.md, session 11), with
the same bits. Each program takes a (BR rows, BC columns) tile of the gate and the up halves.
The arithmetic is that of the compiled kernel and of the decode experts' epilogue: float32,
one rounding at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gated_kernel(H, A, M, C, stride_h, stride_a, BR: tl.constexpr, BC: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (rows < M)[:, None] & (cols < C)[None, :]
    src = H + rows.to(tl.int64)[:, None] * stride_h + cols[None, :]
    g = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(src + C, mask=mask, other=0.0).to(tl.float32)
    a = g * tl.sigmoid(g) * u
    tl.store(A + rows.to(tl.int64)[:, None] * stride_a + cols[None, :],
             a.to(A.dtype.element_ty), mask=mask)


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """SiLU(h[:, :c]) · h[:, c:] for h (M, 2c) with unit column stride."""
    M, two_c = h.shape
    C = two_c // 2
    assert h.stride(1) == 1
    out = torch.empty(M, C, dtype=h.dtype, device=h.device)
    if M:
        br, bc = 16, 256
        _gated_kernel[(triton.cdiv(M, br), triton.cdiv(C, bc))](
            h, out, M, C, h.stride(0), out.stride(0), BR=br, BC=bc, num_warps=4)
    return out
