"""Small elementwise pieces of the decoder: RMSNorm, rotary embeddings (Hugging Face's
rotate-half convention), SiLU-gated products.

Shape legend: T tokens, nh heads, d head dim, H hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32, scaled by ``weight`` after casting back (as transformers does)."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


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
        cos = self.cos[positions].to(x.dtype).unsqueeze(1)  # (T, 1, d)
        sin = self.sin[positions].to(x.dtype).unsqueeze(1)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
