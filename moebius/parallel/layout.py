"""Layouts as data: which rank owns which slice of which tensor, under TP and under EP.

Shape legend: N ranks, E experts, I expert intermediate size, c = I/N, H hidden size.

Expert weights are stored as *pieces*. Piece (e, s) is the s-th intermediate shard of expert
e: w13 rows [gate[sc:(s+1)c]; up[sc:(s+1)c]] (2c, H) and w2ᵀ rows down[:, sc:(s+1)c]ᵀ (c, H).
Each rank holds E pieces per layer in one buffer, in both layouts:

- TP: rank r holds pieces (e, r) for every e, at index e.
- EP: rank r holds pieces (e, s) of its experts e = rE/N + j, every s, at index s·E/N + j.

Index range [qE/N, (q+1)E/N) of rank p holds, under TP, p's shards of q's experts and, under
EP, q's shards of p's experts. So a switch, either way, swaps range q of rank p with range p of
rank q for every pair p != q: an involution that moves exactly the owner-changed pieces and
leaves range p of rank p in place.
"""

from __future__ import annotations

from dataclasses import dataclass

from moebius.config import ModelConfig


@dataclass(frozen=True)
class Layout:
    """One rank's view of a layout: ``mode`` is "tp" or "ep"."""

    mode: str
    rank: int
    world_size: int

    @property
    def is_tp(self) -> bool:
        return self.mode == "tp"

    # --- experts -------------------------------------------------------------------------
    def num_local_experts(self, num_experts: int) -> int:
        return num_experts if self.is_tp else num_experts // self.world_size

    def first_local_expert(self, num_experts: int) -> int:
        return 0 if self.is_tp else self.rank * num_experts // self.world_size

    # --- attention -----------------------------------------------------------------------
    def q_heads(self, cfg: ModelConfig) -> range:
        """The query heads this rank computes."""
        if not self.is_tp:
            return range(cfg.num_heads)
        per = cfg.num_heads // self.world_size
        return range(self.rank * per, (self.rank + 1) * per)

    def kv_heads(self, cfg: ModelConfig) -> range:
        """The KV heads this rank stores (replicated under TP when kv heads < N)."""
        if not self.is_tp:
            return range(cfg.num_kv_heads)
        n, kv = self.world_size, cfg.num_kv_heads
        if kv >= n:
            per = kv // n
            return range(self.rank * per, (self.rank + 1) * per)
        group = cfg.num_heads // kv  # q heads per kv head
        first_q = self.q_heads(cfg).start
        return range(first_q // group, first_q // group + 1)

    def num_local_kv_heads(self, cfg: ModelConfig) -> int:
        return len(self.kv_heads(cfg))


def ep_owner(expert: int, num_experts: int, world_size: int) -> int:
    return expert // (num_experts // world_size)


def piece_index(mode: str, expert: int, shard: int, num_experts: int, world_size: int) -> tuple:
    """(rank, index in that rank's layer buffer) of piece (expert, shard) under ``mode``."""
    if mode == "tp":
        return shard, expert
    per = num_experts // world_size
    owner = expert // per
    return owner, shard * per + expert - owner * per


def kv_head_owners(cfg: ModelConfig, world_size: int) -> list[list[int]]:
    """For each KV head, the ranks that hold it under TP (several when replicated)."""
    owners: list[list[int]] = [[] for _ in range(cfg.num_kv_heads)]
    for r in range(world_size):
        for h in Layout("tp", r, world_size).kv_heads(cfg):
            owners[h].append(r)
    return owners
