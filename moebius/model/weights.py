"""The weights of one rank: dense weights whole (TP reads its shard as a view) and the expert
store, one fixed buffer per MoE layer read the same way under both layouts.

Shape legend: E experts, I expert intermediate, H hidden, N ranks, c = I/N.
The store holds E *pieces* per layer (see parallel/layout.py): under TP piece e is this rank's
c-wide shard of expert e; under EP piece s·E/N + j is shard s of local expert j. Either way the
view is (E, 2c, H) for w13 and (E, c, H) for w2ᵀ; only the token -> piece routing differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moebius.config import ModelConfig
from moebius.parallel.layout import Layout, piece_index


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # (H,)
    post_norm: torch.Tensor  # (H,)
    q_proj: torch.Tensor | None = None  # (nh·d, H); MLA without q_lora: (nh·(dn+dr), H)
    k_proj: torch.Tensor | None = None  # (nkv·d, H); None under MLA
    v_proj: torch.Tensor | None = None  # (nkv·d, H); None under MLA
    qkv_proj: torch.Tensor | None = None  # [q; k; v] rows: q/k/v_proj are views of it
    o_proj: torch.Tensor | None = None  # (H, nh·d); MLA: (H, nh·dv)
    q_norm: torch.Tensor | None = None  # (d,)
    k_norm: torch.Tensor | None = None  # (d,)
    router: torch.Tensor | None = None  # (E, H); None for a dense layer
    moe_index: int = -1  # index among MoE layers; -1 for a dense layer
    dense: dict[str, torch.Tensor] = field(default_factory=dict)  # gate (I,H), up (I,H), down (H,I)
    # DeepSeek: MLA projections under Hugging Face's names (model/mla.py), shared experts
    # (gate/up/down as ``dense``) and V3's router bias (E,) in float32
    mla: dict[str, torch.Tensor] = field(default_factory=dict)
    shared: dict[str, torch.Tensor] = field(default_factory=dict)
    router_bias: torch.Tensor | None = None
    # One token at one rank, MOEBIUS_FOLD_ROUTER=1 (model/router_fold.py): [o; router·diag(post
    # norm)·o] rows (o_proj is a view of the first H) and router·diag(post norm) (E, H)
    o_route: torch.Tensor | None = None
    router_res: torch.Tensor | None = None


class ExpertStore:
    """All MoE layers' expert pieces of one rank in two fixed buffers (w13 and w2ᵀ)."""

    def __init__(self, cfg: ModelConfig, world_size: int, dtype, device) -> None:
        self.cfg = cfg
        self.world_size = world_size
        self.num_moe_layers = len(cfg.moe_layers)
        E, I, H, N = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size, world_size
        self.shard = I // N
        self.w13 = torch.empty(
            self.num_moe_layers, E, 2 * self.shard, H, dtype=dtype, device=device
        )
        self.w2 = torch.empty(self.num_moe_layers, E, self.shard, H, dtype=dtype, device=device)
        # Staging for a switch: one peer's range (E/N pieces) of one layer, allocated once.
        per = E // N
        self.stage13 = torch.empty(
            (per, 2 * self.shard, H) if N > 1 else (0,), dtype=dtype, device=device
        )
        self.stage2 = torch.empty(
            (per, self.shard, H) if N > 1 else (0,), dtype=dtype, device=device
        )

    def view(self, moe_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 (E, 2c, H), w2ᵀ (E, c, H)) pieces of one layer."""
        return self.w13[moe_index], self.w2[moe_index]

    def fill_part(self, moe_index: int, layout: Layout, expert: int, part: str, t) -> None:
        """Write expert ``expert``'s Hugging Face ``part``, gate (I, H), up (I, H) or down
        (H, I), into the pieces ``layout`` gives this rank: under TP its own shard, under EP
        every shard."""
        c = self.shard
        w13, w2 = self.view(moe_index)
        shards = [layout.rank] if layout.is_tp else range(self.world_size)
        for s in shards:
            _, idx = piece_index(layout.mode, expert, s, self.cfg.num_experts, self.world_size)
            if part == "gate":
                w13[idx, :c].copy_(t[s * c : (s + 1) * c])
            elif part == "up":
                w13[idx, c:].copy_(t[s * c : (s + 1) * c])
            else:
                w2[idx].copy_(t[:, s * c : (s + 1) * c].t())

    def nbytes(self) -> int:
        return self.w13.numel() * self.w13.element_size() + self.w2.numel() * self.w2.element_size()

    def staging_nbytes(self) -> int:
        return (self.stage13.numel() + self.stage2.numel()) * self.stage13.element_size()


@dataclass
class ModelWeights:
    embed: torch.Tensor  # (V, H)
    norm: torch.Tensor  # (H,)
    lm_head: torch.Tensor  # (V, H); may alias embed when tied
    layers: list[LayerWeights]
    experts: ExpertStore

    def dense_nbytes(self) -> int:
        seen: set[int] = set()
        total = 0
        tensors = [self.embed, self.norm, self.lm_head]
        for lw in self.layers:
            tensors += [t for t in vars(lw).values() if isinstance(t, torch.Tensor)]
            tensors += [*lw.dense.values(), *lw.mla.values(), *lw.shared.values()]
        for t in tensors:  # views (q/k/v of qkv, a tied head) count once, by storage
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total
