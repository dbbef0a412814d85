"""Sampling on the device: greedy, temperature, top-k, top-p, min-p, with a counter-based
random stream per request; before it, the logits' rules: allowed tokens, logit bias,
penalties (the runner applies them in vLLM's order: ModelRunner._sample).

Each request's noise is a pure function of (seed, output index, token id): a hash, turned
into Gumbel noise, so ``argmax(logits / T + gumbel)`` is an exact draw from the filtered
softmax. A draw therefore never depends on batch composition, on which rank samples, on
preemption or on a layout switch; no generator state has to travel with a request.

Shape legend: B rows, V vocabulary.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:  # Triton is there on GPU machines; the CPU path never needs it
    from moebius.model.triton_sample import filtered_draw, gumbel_max
except ImportError:  # pragma: no cover - depends on the install
    filtered_draw = gumbel_max = None

# On CUDA the draw is one Triton pass over the logits (model/triton_sample.py) instead of ~24
# torch passes over (B, V) int64/float64 noise; the same tokens. Session 12, one H100: the
# draw at batch 256 5.50 -> 0.59 ms, a Qwen3-30B-A3B decode step with temperature 1 at batch
# 256 31.30 -> 26.47 ms (`python -m moebius.bench.sampling`). MOEBIUS_FUSED_SAMPLING=0: torch.
FUSED_DRAW = os.environ.get("MOEBIUS_FUSED_SAMPLING", "1") == "1"
# With top-k/top-p/min-p, the filter and the draw in one Triton kernel without sorting the row
# (triton_sample.filtered_draw), the same tokens. Session 13, one H100: the draw with top-p 0.9
# at batch 256 5.68 -> 1.08 ms; a decode step with temperature 1 and top-p 0.9 at batch 256
# 31.98 -> 27.73 ms, at batch 1 3.30 -> 3.15. MOEBIUS_FUSED_FILTER=0: sort the row in torch.
FUSED_FILTER = os.environ.get("MOEBIUS_FUSED_FILTER", "1") == "1"

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (lowbias32) on int64 tensors holding values < 2**32."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, V) uniforms in (0, 1) from per-row seeds and steps (int64)."""
    v = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    row = _hash32(_hash32(seeds) ^ (steps * 0x9E3779B1))
    bits = _hash32(row[:, None] * 0x85EBCA6B + v[None, :] + 0x632BE5AB)
    return ((bits >> 8).to(torch.float64) + 0.5) / float(1 << 24)


@dataclass
class SamplingTensors:
    temperature: torch.Tensor  # (B,) float32; 0 = greedy
    top_k: torch.Tensor  # (B,) long; 0 = off
    top_p: torch.Tensor  # (B,) float32
    min_p: torch.Tensor  # (B,) float32
    seeds: torch.Tensor  # (B,) long
    steps: torch.Tensor  # (B,) long: index of the token being sampled
    need_filter: bool
    all_greedy: bool


def sample(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """logits (B, V) float32 -> token ids (B,) long."""
    greedy = logits.argmax(dim=-1)
    if st.all_greedy:
        return greedy
    temp = torch.where(st.temperature > 0, st.temperature, 1.0)
    scaled = logits / temp[:, None]
    fused = FUSED_DRAW and gumbel_max is not None and logits.is_cuda
    if fused and st.need_filter and FUSED_FILTER:
        drawn = filtered_draw(scaled.contiguous(), st.top_k, st.top_p, st.min_p, st.seeds,
                              st.steps)
        return torch.where(st.temperature > 0, drawn, greedy)
    if st.need_filter:
        scaled = _filter(scaled, st)
    if fused:
        drawn = gumbel_max(scaled.contiguous(), st.seeds, st.steps)
    else:
        gumbel = -torch.log(-torch.log(uniform_noise(st.seeds, st.steps, logits.shape[-1])))
        drawn = (scaled.double() + gumbel).argmax(dim=-1)
    return torch.where(st.temperature > 0, drawn, greedy)


def apply_token_masks(logits: torch.Tensor, rows: torch.Tensor, packed: torch.Tensor) -> None:
    """Guided decoding, in place on ``logits`` (B, V): rows ``rows`` (n,) keep only the tokens
    whose bit is set in ``packed`` (n, ceil(V'/8)) uint8, little-endian bit order (V' the
    mask's vocabulary: tokens past it are dropped too)."""
    bits = torch.arange(8, device=packed.device, dtype=torch.uint8)
    keep = ((packed.unsqueeze(-1) >> bits) & 1).bool().flatten(1)
    V = logits.shape[1]
    if keep.shape[1] < V:
        keep = torch.nn.functional.pad(keep, (0, V - keep.shape[1]))
    keep = keep[:, :V]
    logits.index_put_((rows,), logits[rows].masked_fill(~keep, float("-inf")))


def apply_logit_rules(logits: torch.Tensor, allowed_rows: torch.Tensor | None,
                      allowed_at: torch.Tensor | None, allowed_ids: torch.Tensor | None,
                      bias_rows: torch.Tensor | None, bias_ids: torch.Tensor | None,
                      bias: torch.Tensor | None) -> None:
    """vLLM's allowed_token_ids, then OpenAI's logit_bias, in place on ``logits`` (B, V).
    Rows ``allowed_rows`` (n,) keep only their listed tokens and every other one becomes -inf:
    ``allowed_ids`` (m,) are the kept tokens, ``allowed_at`` (m,) the index in allowed_rows
    of each one's row. Then ``bias`` (k,) is added at (``bias_rows``, ``bias_ids``) (k,) (a
    token once a row). None: no such row. A bias cannot revive a masked token (-inf + b)."""
    if allowed_rows is not None:
        keep = torch.zeros(len(allowed_rows), logits.shape[1], dtype=torch.bool,
                           device=logits.device)
        keep[allowed_at, allowed_ids] = True
        logits.index_put_((allowed_rows,), logits[allowed_rows].masked_fill(~keep, float("-inf")))
    if bias_rows is not None:
        logits.index_put_((bias_rows, bias_ids), bias, accumulate=True)


def apply_penalties(logits: torch.Tensor, rows: torch.Tensor, presence: torch.Tensor,
                    frequency: torch.Tensor, repetition: torch.Tensor, counts: torch.Tensor,
                    in_prompt: torch.Tensor | None) -> None:
    """Penalties in place on ``logits`` (B, V) rows ``rows`` (n,): first the repetition
    penalty over prompt and outputs (a positive logit divided by it, a negative one
    multiplied), then OpenAI's presence and frequency penalties over the outputs. counts
    (n, V): how often each token occurs in the row's outputs so far; in_prompt (n, V): the
    tokens of its prompt (None: no row has a repetition penalty)."""
    present = counts > 0
    x = logits[rows]
    if in_prompt is not None:
        rep = repetition[:, None]
        hit = in_prompt | present
        x = torch.where(hit, torch.where(x > 0, x / rep, x * rep), x)
    x = x - (presence[:, None] * present + frequency[:, None] * counts)
    logits.index_put_((rows,), x)


def _filter(scaled: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """Mask tokens outside top-k / top-p / min-p with -inf (per row). Each filter keeps a
    prefix of the sorted row; every token equal to the prefix's last is kept too (ties at the
    cut do not depend on the sort's order; ``triton_sample.filtered_draw`` keeps the same)."""
    sorted_logits = scaled.sort(dim=-1, descending=True).values
    probs = sorted_logits.softmax(dim=-1)
    V = scaled.shape[-1]
    rank = torch.arange(V, device=scaled.device)[None, :]
    k = torch.where(st.top_k > 0, st.top_k, V)[:, None]
    drop = rank >= k
    drop |= ((probs.cumsum(dim=-1) - probs) >= st.top_p[:, None]) & (st.top_p[:, None] < 1)
    drop |= probs < st.min_p[:, None] * probs[:, :1]
    drop[:, 0] = False  # the most likely token always survives
    last = (~drop).sum(-1, keepdim=True) - 1  # every filter drops a suffix
    return scaled.masked_fill(scaled < sorted_logits.gather(1, last), float("-inf"))


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, num_top: int):
    """(sampled logprob (B,), top ids (B, n), top logprobs (B, n)) of ``logits`` as given:
    the runner passes them with its masks, logit_bias and penalties applied, before the
    temperature and the filters (ModelRunner._sample). Masked tokens' logprobs are -inf."""
    lp = torch.log_softmax(logits, dim=-1)
    chosen = lp.gather(1, tokens[:, None]).squeeze(1)
    top_lp, top_ids = lp.topk(num_top, dim=-1) if num_top else (lp[:, :0], tokens[:, None][:, :0])
    return chosen, top_ids, top_lp


def score_tokens(hidden: torch.Tensor, lm_head: torch.Tensor, targets: torch.Tensor,
                 num_top: int, rows_per_pass: int = 256):
    """(logprob (R,), rank (R,), top ids (R, n), top logprobs (R, n)) of each ``targets[i]``
    under the logits of ``hidden[i]``: prompt logprobs, vLLM's, of the raw model output (no
    penalty, bias or temperature). The rank counts the tokens at least as likely, itself
    included (1: the argmax), as vLLM's. In passes of ``rows_per_pass`` rows: a 2,048-token
    prompt's float32 logits are 1.2 GB at Qwen3's vocabulary."""
    outs = []
    for a in range(0, hidden.shape[0], rows_per_pass):
        lp = torch.log_softmax((hidden[a : a + rows_per_pass] @ lm_head.t()).float(), dim=-1)
        chosen = lp.gather(1, targets[a : a + rows_per_pass, None])
        rank = (lp >= chosen).sum(dim=1)
        top_lp, top_ids = lp.topk(num_top, dim=-1)
        outs.append((chosen.squeeze(1), rank, top_ids, top_lp))
    return tuple(torch.cat(col) for col in zip(*outs, strict=True))
