"""KV block bookkeeping for one pool view (ids only, no tensors): allocation, reference
counts, and automatic prefix caching.

A full block is identified by the hash of (previous block's hash, its tokens); the tokens are
kept to rule out collisions. A freed block keeps its hash and contents and stays findable
until it is evicted (least recently freed first), so a shared system prompt or the ``n``
completions of one prompt reuse the KV instead of recomputing it.

A cached block may carry opaque per-block data (``block_meta``, keyed by the block's hash)
that lives exactly as long as the block stays findable: the prefill role keeps each block's
per-layer top-k expert counts there, so a prefix-cache hit keeps the prefix's counts.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


class _Blocks(dict):
    """block id -> Block, made on first access."""

    def __missing__(self, block_id: int) -> Block:
        blk = self[block_id] = Block(block_id)
        return blk


@dataclass
class Block:
    """What a cached (hashed) block keeps; reference counts live in ``BlockManager.ref``."""

    block_id: int
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


def chain_hash(prev: int | None, tokens: tuple[int, ...]) -> int:
    return hash((prev, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.caching = enable_prefix_caching
        # Cheap to create and to fill (a switch makes new managers for ~10^5 blocks and
        # allocates most of them at once): reference counts in one list, Block objects only for
        # blocks given a hash, never-used blocks as a counter (taken first, ahead of every freed
        # block), freed blocks in eviction order (cached ones keep their hash).
        self.ref = [0] * num_blocks
        self.blocks = _Blocks()
        self.never_used = 0  # blocks [never_used, num_blocks) were never handed out
        self.free: OrderedDict[int, None] = OrderedDict()
        self.hash_to_block: dict[int, int] = {}
        self.block_meta: dict[int, object] = {}  # hash -> data of a cached block (opaque)

    # ------------------------------------------------------------------ queries
    @property
    def num_free(self) -> int:
        return len(self.free) + self.num_blocks - self.never_used

    def usage(self) -> float:
        return 1.0 - self.num_free / max(self.num_blocks, 1)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def match_prefix(self, token_ids: list[int]) -> list[int]:
        """Cached block ids for the longest prefix of full blocks, leaving at least one token
        to compute (the step must produce logits)."""
        if not self.caching:
            return []
        bs = self.block_size
        out: list[int] = []
        h = None
        for i in range((len(token_ids) - 1) // bs):
            toks = tuple(token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(h, toks)
            bid = self.hash_to_block.get(h)
            if bid is None or self.blocks[bid].token_ids != toks:
                break
            out.append(bid)
        return out

    def cached_meta(self, block_ids: list[int]) -> list:
        """The data kept with each block (None for a block without any)."""
        return [self.block_meta.get(self.blocks[b].hash) for b in block_ids]

    # ------------------------------------------------------------------ changes
    def allocate(self, cached: list[int], num_tokens: int) -> list[int]:
        """Take the ``cached`` blocks (ref +1) and fresh blocks up to ``num_tokens``."""
        need = self.blocks_needed(num_tokens) - len(cached)
        fresh_needed = need + sum(1 for b in cached if self.ref[b] == 0)
        if fresh_needed > self.num_free:
            raise MemoryError("not enough free KV blocks")
        table = []
        for b in cached:
            self._ref(b)
            table.append(b)
        table += self._take_fresh(max(need, 0))
        return table

    def can_allocate(self, cached: list[int], num_tokens: int) -> bool:
        revived = sum(1 for b in cached if self.ref[b] == 0)
        return self.blocks_needed(num_tokens) - len(cached) + revived <= self.num_free

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(table) <= self.num_free

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Append fresh blocks to ``table`` so it holds ``num_tokens``."""
        table += self._take_fresh(max(self.blocks_needed(num_tokens) - len(table), 0))

    def free_table(self, table: list[int]) -> None:
        # Free in reverse so a sequence's tail is evicted before its (more shareable) head.
        ref = self.ref
        for b in reversed(table):
            ref[b] -= 1
            if ref[b] == 0:
                self.free[b] = None
        table.clear()

    def commit_full_blocks(
        self,
        table: list[int],
        token_ids: list[int],
        num_computed: int,
        hashes: list[int],
        meta: dict[int, object] | None = None,
    ) -> None:
        """Register the hashes of blocks that became full of computed tokens. ``hashes`` is the
        request's chain of full-block hashes so far; it is extended in place. ``meta`` (block
        index -> data) is kept with each newly registered block that has an entry."""
        if not self.caching:
            return
        bs = self.block_size
        for i in range(len(hashes), num_computed // bs):
            toks = tuple(token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(hashes[-1] if hashes else None, toks)
            hashes.append(h)
            blk = self.blocks[table[i]]
            if blk.hash is None and h not in self.hash_to_block:
                blk.hash, blk.token_ids = h, toks
                self.hash_to_block[h] = blk.block_id
                if meta is not None and i in meta:
                    self.block_meta[h] = meta[i]

    def forget_cached(self) -> None:
        """Drop every hash (free cached blocks become plain free blocks; blocks in use stay
        allocated): their bytes are about to be rewritten through another view of the pool."""
        for blk in self.blocks.values():
            blk.hash, blk.token_ids = None, ()
        self.hash_to_block.clear()
        self.block_meta.clear()

    def reset(self) -> None:
        """Forget everything (used when the pool's view changes at a switch)."""
        self.__init__(self.num_blocks, self.block_size, self.caching)

    # ------------------------------------------------------------------ internals
    def _ref(self, b: int) -> None:
        if self.ref[b] == 0:
            self.free.pop(b, None)
        self.ref[b] += 1

    def _take_fresh(self, n: int) -> list[int]:
        """``n`` free blocks (ref 1): never-used ones first, then the least recently freed,
        whose hash (if cached) is dropped."""
        start = self.never_used
        take = min(n, self.num_blocks - start)
        out = list(range(start, start + take))
        self.ref[start : start + take] = [1] * take
        self.never_used += take
        for _ in range(n - take):
            b, _ = self.free.popitem(last=False)
            blk = self.blocks.get(b)
            if blk is not None and blk.hash is not None:
                if self.hash_to_block.get(blk.hash) == b:
                    del self.hash_to_block[blk.hash]
                    self.block_meta.pop(blk.hash, None)
                blk.hash, blk.token_ids = None, ()
            self.ref[b] = 1
            out.append(b)
        return out
