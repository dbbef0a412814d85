"""Small pieces of the decoder: RMSNorm, rotary embeddings (Hugging Face's rotate-half
convention), SiLU-gated products, the projection of a few decode tokens.

Shape legend: T tokens, nh heads, d head dim, H hidden.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # Triton is there on GPU machines; the CPU path never needs it
    from moebius.model import triton_gemv, triton_norm
except ImportError:  # pragma: no cover - depends on the install
    triton_gemv = triton_norm = None
try:  # Gluon (Triton's explicit-layout dialect): Triton 3.5 and later
    from moebius.model import gluon_gemv
except ImportError:  # pragma: no cover - depends on the install
    gluon_gemv = None

# On CUDA, small elementwise chains are fused by torch.compile (one Triton kernel instead of
# 5-10 eager launches each); MOEBIUS_COMPILE=0 turns it off. CPU always runs them eagerly.
COMPILE = os.environ.get("MOEBIUS_COMPILE", "1") != "0"


def fused_on_cuda(fn):
    """``fn`` eagerly on CPU, compiled (dynamic shapes, one graph) on CUDA tensors."""
    compiled = None

    @functools.wraps(fn)
    def wrapper(x, *args):
        nonlocal compiled
        if not (COMPILE and x.is_cuda):
            return fn(x, *args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        return compiled(x, *args)

    return wrapper


@fused_on_cuda
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32, scaled by ``weight`` after casting back (as transformers does)."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


@dataclass
class ExpertRows:
    """The experts' outputs of T tokens, not yet weighted, gathered or summed: token t's r-th
    part is ``weights[t, r] · rows[index[t, r]]`` (rows in the experts' order, as grouped GEMMs
    leave them)."""

    rows: torch.Tensor  # (M, H)
    index: torch.Tensor  # (T, R) long
    weights: torch.Tensor  # (T, R), rows' dtype

    def sum(self) -> torch.Tensor:
        return (self.rows[self.index] * self.weights[..., None]).sum(1)


def add_rms_norm(x: torch.Tensor, parts, weight: torch.Tensor, eps: float):
    """The residual add and the norm after it: (x + Σ_r parts[:, r], RMSNorm of that).

    ``parts`` is (T, H), (T, R, H) (e.g. the experts' K weighted outputs of each token, not yet
    summed), an ``ExpertRows`` or None (x only normed). On CUDA one Triton launch
    (model/triton_norm.py) with the same rounding as these eager ops."""
    if x.is_cuda and triton_norm is not None:
        return triton_norm.add_rms_norm(x, parts, weight, eps)
    if isinstance(parts, ExpertRows):
        parts = parts.sum()
    if parts is not None:
        x = x + (parts if parts.dim() == 2 else parts.sum(1))
    return x, rms_norm(x, weight, eps)


def project(x: torch.Tensor, w: torch.Tensor, projection: str = "") -> torch.Tensor:
    """x (T, K) @ w (N, K)ᵀ: a few bf16 CUDA tokens through a GEMV that reads its weights
    before waiting on the kernel before (model/gluon_gemv.py where on, model/triton_gemv.py),
    otherwise ``F.linear``. ``projection``: "qkv" or "o" (which may hold its weight in shared
    memory)."""
    if gluon_gemv is not None and gluon_gemv.usable(x, w, projection):
        return gluon_gemv.gemv(x, w)
    if triton_gemv is not None and triton_gemv.usable(x, w):
        return triton_gemv.gemv(x, w)
    return F.linear(x, w)


@fused_on_cuda
def _rope(x: torch.Tensor, positions: torch.Tensor, cos_t, sin_t) -> torch.Tensor:
    cos = cos_t[positions].to(x.dtype).unsqueeze(1)  # (T, 1, d)
    sin = sin_t[positions].to(x.dtype).unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Rotary:
    """cos/sin tables for positions 0..max_positions-1, computed once in float32."""

    def __init__(self, head_dim: int, theta: float, max_positions: int, device) -> None:
        inv_freq = 1.0 / (
            theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float().to(device) / head_dim)
        )
        pos = torch.arange(max_positions, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()  # (P, d)

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (T, nh, d) rotated by each token's position."""
        return _rope(x, positions, self.cos, self.sin)


