"""Attention over the paged KV pool: write the new keys/values into their slots, then attend.

On CUDA, Triton kernels read the pages in place (triton_attention.py for decode tokens,
triton_prefill.py for all prefill chunks in one launch). The reference path (CPU, tests)
gathers each sequence's pages with its block table and calls SDPA: all decode tokens in one
batched call (padded to the longest context), each prefill chunk alone.

Shape legend: T tokens, B sequences, nh query heads, kvh KV heads, d head dim,
NB blocks, bs block size, S gathered context length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # Triton is there on GPU machines; the CPU path never needs it
    from moebius.model.triton_attention import paged_decode_attention as _triton_decode
    from moebius.model.triton_prefill import PrefillPlan, paged_prefill_attention
    from moebius.model.triton_qk import supported as head_dim_ok  # tl.arange: a power of two
except ImportError:  # pragma: no cover - depends on the install
    _triton_decode = None


@dataclass
class PrefillChunk:
    token_start: int  # index of the chunk's first token in the flat batch
    num_tokens: int
    start_pos: int  # position of the chunk's first token in its sequence
    block_table: torch.Tensor  # (nb,) long


@dataclass
class AttentionMeta:
    """Per-step tensors for attention, shared by every layer."""

    slot_mapping: torch.Tensor  # (T,) long: flat slot (block·bs + offset) of each new token
    decode_token_idx: torch.Tensor  # (Bd,) long: flat index of each decode token
    decode_block_tables: torch.Tensor  # (Bd, max_blocks) long, padded with 0
    decode_ctx_lens: torch.Tensor  # (Bd,) long: context length including the new token
    prefills: list[PrefillChunk]
    decode_max_context: int = 0  # an upper bound of decode_ctx_lens (fixed under CUDA graphs)
    prefill_plan: object = None  # the Triton prefill kernel's tensors, built at the first layer


def write_kv(k_cache, v_cache, k, v, slot_mapping) -> None:
    """k, v (T, kvh, d) into caches (NB, bs, kvh, d) at ``slot_mapping``."""
    kvh, d = k.shape[1], k.shape[2]
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v)


def paged_attention(q, k_cache, v_cache, meta: AttentionMeta, scale: float) -> torch.Tensor:
    """q (T, nh, d) -> (T, nh, d), keys and values already written."""
    bs, kvh, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    triton_ok = q.is_cuda and _triton_decode is not None
    if triton_ok and not meta.prefills and meta.decode_token_idx.numel() == q.shape[0]:
        # decode only (every graph-replayed step): the batch is the kernel's input, in order
        return _triton_decode(q, k_cache, v_cache, meta.decode_block_tables,
                              meta.decode_ctx_lens, scale, meta.decode_max_context)
    out = torch.empty_like(q)
    if meta.decode_token_idx.numel() and triton_ok:
        out[meta.decode_token_idx] = _triton_decode(
            q[meta.decode_token_idx],
            k_cache,
            v_cache,
            meta.decode_block_tables,
            meta.decode_ctx_lens,
            scale,
            meta.decode_max_context,
        )
    elif meta.decode_token_idx.numel():
        qd = q[meta.decode_token_idx].unsqueeze(2)  # (Bd, nh, 1, d)
        tables = meta.decode_block_tables
        B, nb = tables.shape
        k = k_cache[tables].view(B, nb * bs, kvh, d).transpose(1, 2)  # (Bd, kvh, S, d)
        v = v_cache[tables].view(B, nb * bs, kvh, d).transpose(1, 2)
        pos = torch.arange(nb * bs, device=q.device)
        mask = (pos[None, :] < meta.decode_ctx_lens[:, None])[:, None, None, :]
        o = F.scaled_dot_product_attention(qd, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[meta.decode_token_idx] = o.squeeze(2)
    if meta.prefills and triton_ok and head_dim_ok(d):
        if meta.prefill_plan is None:
            meta.prefill_plan = PrefillPlan.build(meta.prefills, q.device)
        paged_prefill_attention(q, k_cache, v_cache, meta.prefill_plan, scale, out)
        return out
    for c in meta.prefills:
        ctx = c.start_pos + c.num_tokens
        k = k_cache[c.block_table].view(-1, kvh, d)[:ctx].transpose(0, 1)  # (kvh, S, d)
        v = v_cache[c.block_table].view(-1, kvh, d)[:ctx].transpose(0, 1)
        qc = q[c.token_start : c.token_start + c.num_tokens].transpose(0, 1)  # (nh, t, d)
        qpos = c.start_pos + torch.arange(c.num_tokens, device=q.device)
        mask = torch.arange(ctx, device=q.device)[None, :] <= qpos[:, None]
        o = F.scaled_dot_product_attention(qc, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[c.token_start : c.token_start + c.num_tokens] = o.transpose(0, 1)
    return out
