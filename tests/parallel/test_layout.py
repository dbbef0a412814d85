"""Ownership maps and the expert swap plan, without processes."""

from __future__ import annotations

import itertools

import pytest

from moebius.config import preset
from moebius.parallel.layout import Layout, kv_head_owners, piece_index
from moebius.parallel.reshard import expert_rounds, owner_changed_expert_bytes


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_piece_maps_are_bijections(n):
    E = 24
    for mode in ("tp", "ep"):
        slots = {piece_index(mode, e, s, E, n) for e in range(E) for s in range(n)}
        assert slots == {(r, i) for r in range(n) for i in range(E)}


@pytest.mark.parametrize("n", [2, 4, 8])
def test_switch_is_a_swap_of_ranges(n):
    """Range q of rank p under TP holds exactly what range p of rank q holds under EP."""
    E = 16
    per = E // n
    tp = {piece_index("tp", e, s, E, n): (e, s) for e in range(E) for s in range(n)}
    ep = {piece_index("ep", e, s, E, n): (e, s) for e in range(E) for s in range(n)}
    for p, q in itertools.product(range(n), range(n)):
        for j in range(per):
            assert tp[(p, q * per + j)] == ep[(q, p * per + j)]


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_rounds_cover_every_pair_once_and_are_disjoint(n):
    rounds = expert_rounds(n)
    seen = [tuple(sorted(pq)) for r in rounds for pq in r]
    assert sorted(seen) == sorted(itertools.combinations(range(n), 2))
    if n & (n - 1) == 0:
        for r in rounds:
            ranks = [x for pq in r for x in pq]
            assert len(ranks) == len(set(ranks))


def test_owner_changed_bytes_qwen3_30b():
    """(N-1)/N of the expert bytes change owner: 14.5 GB per rank at N=2 (issue 5's figure)."""
    cfg = preset("qwen3-30b-a3b")
    moved = owner_changed_expert_bytes(cfg, 2, 2)
    total = 48 * 128 * 3 * 768 * 2048 * 2
    assert moved == total // 2
    assert abs(moved / 2 / 1e9 - 14.5) < 0.1


def test_kv_heads_replicated_when_fewer_than_ranks():
    cfg = preset("qwen3-30b-a3b")  # 32 q heads, 4 kv heads
    owners = kv_head_owners(cfg, 8)
    assert [len(o) for o in owners] == [2, 2, 2, 2]
    for r in range(8):
        lay = Layout("tp", r, 8)
        q = lay.q_heads(cfg)
        (h,) = lay.kv_heads(cfg)
        assert all(qh // 8 == h for qh in q)  # each q head's kv head is local
    assert list(Layout("ep", 3, 8).kv_heads(cfg)) == [0, 1, 2, 3]
