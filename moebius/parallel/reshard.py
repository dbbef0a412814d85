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
    """(src rank, dst rank, kv heads) triples needed to re-home one request's KV."""
    owners = kv_head_owners(cfg, world_size)
    out = []
    if target == "ep":  # gather all heads onto the new owner
        o = move.new_owner
        for h in range(cfg.num_kv_heads):
            if o in owners[h]:
                continue
            out.append((min(owners[h]), o, [h]))
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


def reshard_kv(runner, moves: list[KVMove], old: Layout, new: Layout,
               layers: list[int] | None = None) -> int:
    """Re-home the computed KV of running requests (of ``layers``, default all). Returns bytes
    sent by this rank."""
    cfg, comm, pool, rank = runner.model, runner.comm, runner.kv, runner.rank
    bs = pool.block_size
    layers = list(range(cfg.num_layers)) if layers is None else layers
    L = len(layers)

    def read(blocks: list[int], n: int, layout: Layout) -> torch.Tensor:
        # (L, P, n, kvh_local, d) of the first n tokens; P planes: K and V, or MLA's latent
        idx = torch.tensor(blocks, dtype=torch.long, device=pool.buf.device)
        out = []
        for layer in layers:
            planes = pool.view(layer, layout)
            out.append(torch.stack([c[idx].flatten(0, 1)[:n] for c in planes]))
        return torch.stack(out)

    def write(data: torch.Tensor, blocks: list[int], n: int, layout: Layout) -> None:
        slots = torch.tensor(
            [blocks[i // bs] * bs + i % bs for i in range(n)],
            dtype=torch.long,
            device=pool.buf.device,
        )
        for j, layer in enumerate(layers):
            for p, c in enumerate(pool.view(layer, layout)):
                c.view(-1, *c.shape[2:]).index_copy_(0, slots, data[j, p])

    # 1. read everything this rank holds of the moved requests, before any write
    held: dict[str, torch.Tensor] = {}
    for m in moves:
        if m.num_tokens and (old.is_tp or m.old_owner == rank):
            held[m.request_id] = read(m.old_blocks, m.num_tokens, old)
    old_heads = list(old.kv_heads(cfg))
    new_heads = list(new.kv_heads(cfg)) if new.is_tp else list(range(cfg.num_kv_heads))
    # 2. exchange
    sends, recvs, assembled = [], [], {}
    sent = 0
    for m in moves:
        if not m.num_tokens:
            continue
        dst_here = new.is_tp or m.new_owner == rank
        if dst_here:
            buf = torch.empty(
                L,
                pool.num_planes,
                m.num_tokens,
                len(new_heads),
                cfg.head_dim,
                dtype=pool.buf.dtype,
                device=pool.buf.device,
            )
            assembled[m.request_id] = buf
            if m.request_id in held:  # heads this rank already has
                for j, h in enumerate(old_heads):
                    if h in new_heads:
                        buf[:, :, :, new_heads.index(h)] = held[m.request_id][:, :, :, j]
        for src, dst, heads in kv_transfers(cfg, comm.world_size, m, new.mode):
            if src == rank:
                cols = [old_heads.index(h) for h in heads]
                t = held[m.request_id][:, :, :, cols].contiguous()
                sends.append((t, dst))
                sent += t.numel() * t.element_size()
            if dst == rank:
                t = torch.empty(
                    L,
                    pool.num_planes,
                    m.num_tokens,
                    len(heads),
                    cfg.head_dim,
                    dtype=pool.buf.dtype,
                    device=pool.buf.device,
                )
                recvs.append((t, src, m.request_id, heads))
    comm.p2p(sends, [(t, src) for t, src, _, _ in recvs])
    for t, _, rid, heads in recvs:
        for j, h in enumerate(heads):
            assembled[rid][:, :, :, new_heads.index(h)] = t[:, :, :, j]
    comm.barrier()  # every rank has read its old view
    # 3. write into the new view
    for m in moves:
        if m.request_id in assembled:
            write(assembled[m.request_id], m.new_blocks, m.num_tokens, new)
    return sent


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
