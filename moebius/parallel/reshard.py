"""Resharding between TP and EP: the plan (pure, from the two ownership maps) and its
execution over torch.distributed point-to-point, for expert weights and for KV.

Experts: by the piece layout of parallel/layout.py, each rank swaps index range q of every MoE
layer with range p of rank q. Both directions are the same swap. Transfers are paired rounds
(partner p XOR r when N is a power of two) through a staging buffer of one range (1/N of a
layer), so no byte is overwritten before it has been sent.

KV: every running request's computed tokens are read out of the old view (this rank's head
slice under TP, all heads on the owner under EP), sent to the ranks that need them in the new
view, then written at the new block ids once every rank has finished reading. MLA's latent is
one KV head that TP replicates: TP->EP sends nothing (the owner has it), EP->TP the owner
sends it to every other rank.
"""

from __future__ import annotations

import os
import time

import torch

from moebius.config import ModelConfig
from moebius.engine.messages import KVMove, SwitchInput, SwitchResult
from moebius.parallel.layout import Layout, kv_head_owners, piece_index


# ---------------------------------------------------------------------- plans (pure)
def expert_rounds(world_size: int) -> list[list[tuple[int, int]]]:
    """Rounds of disjoint (p, q) pairs covering every unordered pair once."""
    n = world_size
    if n & (n - 1) == 0:
        return [[(p, p ^ r) for p in range(n) if p < p ^ r] for r in range(1, n)]
    return [[(p, q) for p in range(n) for q in range(p + 1, n)]]


def owner_changed_expert_bytes(cfg: ModelConfig, world_size: int, elem_size: int) -> int:
    """Bytes of expert pieces whose rank differs between TP and EP, counted piece by piece
    from the ownership maps (independent of how the swap is executed)."""
    E, N = cfg.num_experts, world_size
    c = cfg.moe_intermediate_size // N
    piece = 3 * c * cfg.hidden_size * elem_size  # w13 (2c, H) + w2ᵀ (c, H)
    moved = sum(
        1
        for e in range(E)
        for s in range(N)
        if piece_index("tp", e, s, E, N)[0] != piece_index("ep", e, s, E, N)[0]
    )
    return moved * piece * len(cfg.moe_layers)


def kv_transfers(cfg: ModelConfig, world_size: int, move: KVMove, target: str):
    """(src rank, dst rank, kv heads) triples needed to re-home one request's KV, one per
    (src, dst) pair."""
    owners = kv_head_owners(cfg, world_size)
    out = []
    if target == "ep":  # gather all heads onto the new owner
        o = move.new_owner
        by_src: dict[int, list[int]] = {}
        for h in range(cfg.num_kv_heads):
            if o not in owners[h]:
                by_src.setdefault(min(owners[h]), []).append(h)
        out = [(src, o, heads) for src, heads in sorted(by_src.items())]
    else:  # scatter each rank's heads from the old owner
        o = move.old_owner
        for r in range(world_size):
            if r != o:
                out.append((o, r, list(Layout("tp", r, world_size).kv_heads(cfg))))
    return out


# ---------------------------------------------------------------------- execution
def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reshard_experts(store, comm, rank: int, moe_layers: list[int] | None = None) -> int:
    """Swap ranges with every peer, layer by layer. Returns bytes sent by this rank."""
    n = comm.world_size
    per = store.cfg.num_experts // n
    stage13, stage2 = store.stage13, store.stage2  # allocated once with the store
    sent = 0
    for layer in range(store.num_moe_layers) if moe_layers is None else moe_layers:
        w13, w2 = store.view(layer)
        for pairs in expert_rounds(n):
            for p, q in pairs:
                if rank not in (p, q):
                    continue
                peer = q if rank == p else p
                mine = slice(peer * per, (peer + 1) * per)
                comm.p2p(
                    sends=[(w13[mine], peer), (w2[mine], peer)],
                    recvs=[(stage13, peer), (stage2, peer)],
                )
                w13[mine].copy_(stage13)
                w2[mine].copy_(stage2)
                sent += (stage13.numel() + stage2.numel()) * stage13.element_size()
    return sent


KV_CHUNK_BLOCKS = 1 << 15  # blocks per pass: bounds staging (Qwen3-30B TP2: ~0.8 GB a layer)


def _kv_groups(cfg, rank: int, world_size: int, moves: list[KVMove], old: Layout,
               new: Layout):
    """This rank's part of re-homing ``moves``, grouped so each peer gets one buffer:
    ``sends``/``recvs``: (peer, heads) -> moves; ``local``: heads -> moves whose bytes stay on
    this rank but change block (and view)."""
    old_heads = list(old.kv_heads(cfg))
    new_heads = list(new.kv_heads(cfg)) if new.is_tp else list(range(cfg.num_kv_heads))
    sends: dict[tuple[int, tuple], list[KVMove]] = {}
    recvs: dict[tuple[int, tuple], list[KVMove]] = {}
    local: dict[tuple, list[KVMove]] = {}
    for m in moves:
        holds = old.is_tp or m.old_owner == rank
        if holds and (new.is_tp or m.new_owner == rank):
            keep = tuple(h for h in old_heads if h in new_heads)
            if keep:
                local.setdefault(keep, []).append(m)
        for src, dst, heads in kv_transfers(cfg, world_size, m, new.mode):
            if src == rank:
                sends.setdefault((dst, tuple(heads)), []).append(m)
            if dst == rank:
                recvs.setdefault((src, tuple(heads)), []).append(m)
    return sends, recvs, local, old_heads, new_heads


def _head_view(plane: torch.Tensor, heads: tuple, view_heads: list[int]) -> torch.Tensor:
    """The (NB, bs, len(heads), d) part of a (NB, bs, kvh, d) view holding ``heads``."""
    cols = [view_heads.index(h) for h in heads]
    if cols == list(range(cols[0], cols[0] + len(cols))):
        return plane[:, :, cols[0] : cols[0] + len(cols)]
    raise ValueError(f"KV heads {heads} are not contiguous in the view {view_heads}")


def reshard_kv(runner, moves: list[KVMove], old: Layout, new: Layout,
               layers: list[int] | None = None, chunk_blocks: int = KV_CHUNK_BLOCKS) -> int:
    """Re-home the computed KV of running requests (of ``layers``, default all). Returns bytes
    sent by this rank.

    Whole blocks move (token i of a request sits at slot i % bs of its block i // bs in both
    views), so a gather is one row of bs·heads·d values per block. Layer by layer (a layer's
    bytes in either view lie in that layer's own region of the pool), each rank gathers what it
    sends into one buffer per (peer, heads) and what it keeps into a local buffer, exchanges,
    then scatters into the new view's blocks. Every gather of a layer is queued before any
    scatter on the rank's stream, and a rank writes only its own pool, so no byte is
    overwritten before it is read. Moves go in chunks of ``chunk_blocks`` blocks, so staging
    stays a small fraction of one layer's KV."""
    cfg, comm, pool, rank = runner.model, runner.comm, runner.kv, runner.rank
    bs, dev = pool.block_size, pool.buf.device
    layers = list(range(cfg.num_layers)) if layers is None else layers
    chunks, cur, size = [], [], 0
    for m in moves:
        if not m.num_tokens:
            continue
        nb = (m.num_tokens + bs - 1) // bs
        if cur and size + nb > chunk_blocks:
            chunks.append(cur)
            cur, size = [], 0
        cur.append(m)
        size += nb
    if cur:
        chunks.append(cur)

    def blocks(ms: list[KVMove], which: str) -> torch.Tensor:
        out: list[int] = []
        for m in ms:
            nb = (m.num_tokens + bs - 1) // bs
            out += (m.old_blocks if which == "old" else m.new_blocks)[:nb]
        return torch.tensor(out, dtype=torch.long, device=dev)

    sent = 0
    for chunk in chunks:
        sends, recvs, local, old_heads, new_heads = _kv_groups(
            cfg, rank, comm.world_size, chunk, old, new
        )
        plan = _KVChunk(
            pool, old, new, old_heads, new_heads,
            send=[(peer, h, blocks(ms, "old")) for (peer, h), ms in sends.items()],
            recv=[(peer, h, blocks(ms, "new")) for (peer, h), ms in recvs.items()],
            local=[(h, blocks(ms, "old"), blocks(ms, "new")) for h, ms in local.items()],
        )
        # Pipelined: layer l's transfer runs on NCCL's stream while this stream gathers layer
        # l + 1; its scatter waits for it. Every gather of a layer precedes its scatter.
        pending = None
        for layer in layers:
            out, kept, inbox = plan.gather(layer)
            works = comm.p2p_start(out, [(t, peer) for t, (peer, _, _) in
                                         zip(inbox, plan.recv, strict=True)])
            sent += sum(t.numel() * t.element_size() for t, _ in out)
            if pending is not None:
                plan.finish(*pending)
            pending = (layer, works, kept, inbox, out)
        if pending is not None:
            plan.finish(*pending)
    return sent


class _KVChunk:
    """One chunk of a KV re-homing on this rank: (peer, heads, block ids) to send and to
    receive, (heads, old blocks, new blocks) to keep; gathers and scatters one layer."""

    def __init__(self, pool, old: Layout, new: Layout, old_heads, new_heads, send, recv, local):
        self.pool, self.old, self.new = pool, old, new
        self.old_heads, self.new_heads = old_heads, new_heads
        self.send, self.recv, self.local = send, recv, local

    def _empty(self, h: tuple, ix: torch.Tensor) -> torch.Tensor:
        pool = self.pool
        return torch.empty(pool.num_planes, len(ix), pool.block_size, len(h), pool.cfg.head_dim,
                           dtype=pool.buf.dtype, device=pool.buf.device)

    def _gather(self, layer: int, h: tuple, ix: torch.Tensor) -> torch.Tensor:
        t = self._empty(h, ix)
        for p, plane in enumerate(self.pool.view(layer, self.old)):
            torch.index_select(_head_view(plane, h, self.old_heads), 0, ix, out=t[p])
        return t

    def _scatter(self, layer: int, data: torch.Tensor, h: tuple, ix: torch.Tensor) -> None:
        for p, plane in enumerate(self.pool.view(layer, self.new)):
            _head_view(plane, h, self.new_heads).index_copy_(0, ix, data[p])

    def gather(self, layer: int):
        """(sends [(buffer, peer)], kept buffers, receive buffers) of one layer."""
        out = [(self._gather(layer, h, ix), peer) for peer, h, ix in self.send]
        kept = [self._gather(layer, h, ix) for h, ix, _ in self.local]
        return out, kept, [self._empty(h, ix) for _, h, ix in self.recv]

    def finish(self, layer, works, kept, inbox, sent_bufs) -> None:
        """Wait for the layer's transfers (``sent_bufs`` stay alive until then), scatter."""
        for w in works:
            w.wait()
        for data, (h, _, ix) in zip(kept, self.local, strict=True):
            self._scatter(layer, data, h, ix)
        for data, (_, h, ix) in zip(inbox, self.recv, strict=True):
            self._scatter(layer, data, h, ix)


def execute_switch(runner, switch: SwitchInput) -> SwitchResult:
    """Move ``switch.layers`` (default: every layer) into ``switch.target``."""
    n = runner.comm.world_size
    layers = list(range(runner.model.num_layers)) if switch.layers is None else switch.layers
    source = "ep" if switch.target == "tp" else "tp"
    assert all(runner.layer_modes[i] == source for i in layers), "layers already moved"
    old, new = Layout(source, runner.rank, n), Layout(switch.target, runner.rank, n)
    moe = [lw.moe_index for i, lw in enumerate(runner.weights.layers) if i in set(layers)
           and lw.moe_index >= 0]
    _sync(runner.device)
    t0 = time.perf_counter()
    weight_bytes = reshard_experts(runner.weights.experts, runner.comm, runner.rank, moe)
    if os.environ.get("MOEBIUS_FAULT_SWITCH_RANK") == str(runner.rank):  # fault injection
        raise RuntimeError(f"injected failure on rank {runner.rank} after the expert swap")
    _sync(runner.device)
    t1 = time.perf_counter()
    kv_bytes = reshard_kv(runner, switch.moves, old, new, layers)
    _sync(runner.device)
    t2 = time.perf_counter()
    seconds = {"weights": t1 - t0, "kv": t2 - t1}
    for i in layers:
        runner.layer_modes[i] = switch.target
    return SwitchResult(runner.rank, weight_bytes, kv_bytes, seconds)
