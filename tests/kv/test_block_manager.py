"""Block bookkeeping: allocation, reference counts, prefix caching and eviction."""

from __future__ import annotations

from moebius.kv.block_manager import BlockManager


def test_prefix_hit_needs_committed_full_blocks():
    bm = BlockManager(16, 4)
    toks = list(range(10))
    assert bm.match_prefix(toks) == []
    table = bm.allocate([], 10)
    assert len(table) == 3 and bm.num_free == 13
    hashes: list[int] = []
    bm.commit_full_blocks(table, toks, 10, hashes)
    assert len(hashes) == 2  # only full blocks
    assert bm.match_prefix(toks) == table[:2]
    assert bm.match_prefix(toks[:8]) == table[:1]  # one token must stay uncomputed
    assert bm.match_prefix([99] + toks[1:]) == []


def test_shared_blocks_are_ref_counted_and_survive_free():
    bm = BlockManager(8, 4)
    toks = list(range(9))
    a = bm.allocate([], 9)
    bm.commit_full_blocks(a, toks, 9, [])
    cached = bm.match_prefix(toks)
    b = bm.allocate(cached, 9)
    assert b[:2] == a[:2] and b[2] != a[2]
    assert bm.ref[a[0]] == 2
    bm.free_table(a)
    assert bm.ref[b[0]] == 1
    bm.free_table(b)
    assert bm.num_free == 8
    assert bm.match_prefix(toks) == cached  # freed but still cached


def test_eviction_takes_least_recently_freed_and_drops_hash():
    bm = BlockManager(3, 2)
    t = bm.allocate([], 4)
    bm.commit_full_blocks(t, [1, 2, 3, 4], 4, [])
    bm.free_table(t)
    assert bm.match_prefix([1, 2, 3, 4, 5]) != []
    bm.allocate([], 6)  # needs all three blocks: evicts the cached ones
    assert bm.match_prefix([1, 2, 3, 4, 5]) == []


def test_can_allocate_counts_revived_cached_blocks():
    bm = BlockManager(4, 2)
    t = bm.allocate([], 4)
    bm.commit_full_blocks(t, [1, 2, 3, 4], 4, [])
    bm.free_table(t)
    cached = bm.match_prefix([1, 2, 3, 4, 5])
    assert len(cached) == 2
    assert bm.can_allocate(cached, 8)  # 2 revived + 2 fresh = 4 free blocks
    assert not bm.can_allocate(cached, 10)


def test_block_meta_lives_as_long_as_the_cached_block():
    bm = BlockManager(3, 2)
    t = bm.allocate([], 4)
    bm.commit_full_blocks(t, [1, 2, 3, 4], 4, [], {0: "counts0", 1: "counts1"})
    bm.free_table(t)
    cached = bm.match_prefix([1, 2, 3, 4, 5])
    assert bm.cached_meta(cached) == ["counts0", "counts1"]
    again = bm.allocate(cached, 5)
    other: list[int] = []
    bm.commit_full_blocks(again, [1, 2, 3, 4, 5, 6], 6, other, {0: "x", 1: "y", 2: "counts2"})
    assert bm.cached_meta(again) == ["counts0", "counts1", "counts2"]  # first writer kept
    bm.free_table(again)
    bm.allocate([], 6)  # evicts all three: their data goes with their hashes
    assert bm.block_meta == {}
