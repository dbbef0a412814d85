"""Expert picks of simulated requests, for the prefill/decode routing simulation (`moebius sim
pd`): what a prefill instance reports to the router (the prompt's per-layer top-k counts) and
what each decode step reads (the top-k picks of every decode token).

Two sources:
- ``TopicModel``: a generative model of topic -> expert preference. Each topic prefers a set of
  ``preferred`` experts per MoE layer (drawn at random, seeded). A request has one topic; each
  of its tokens, in each layer, picks m ~ Binomial(k, affinity) experts uniformly without
  replacement from its topic's set and the other k - m uniformly without replacement from the
  remaining experts. ``affinity`` sets the locality: preferred/E (e.g. 16/128) is none at all.
  Prompt and decode tokens come from the same model, so the prompt predicts the decode. A
  prompt's counts are drawn per layer as two multinomials (the preferred set, the rest) with
  the same expectations (within-token distinctness ignored: thousands of prompt tokens).
- ``trace_requests``: real routing (DeepSeek-V2-Lite on 999 chat prompts, /work/shared/data).
  As in moebius/bench/routing_replay.py, a prompt's first half is the prefill and its second
  half stands in for the decode tokens, cycled to the simulated output length.

Decode picks are made on demand, deterministic by (seed, request index), so every policy sees
the same requests. ``locality`` measures a workload's locality the way
/work/shared/data/README.md does for the real trace (per-expert counts of two halves of a
prompt, Pearson, mean over prompts and layers), against the same between different prompts,
so synthetic settings can be put beside real routing.

Shapes: N requests, L MoE layers, E routed experts, S preferred experts, k top-k, T tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moebius.disagg.signature import locality


@dataclass
class ExpertRequests:
    """A pool of requests: the router's input per request and their decode tokens' picks."""

    prefill_counts: np.ndarray  # (N, L, E) top-k counts of each prompt
    prompt_lens: np.ndarray  # (N,) prompt tokens (prefill cost, KV size)
    output_lens: np.ndarray  # (N,) output tokens (the prefill's first one included)
    decode_picks: Callable[[int], np.ndarray]  # i -> (output_lens[i] - 1, L, k) expert ids
    num_experts: int
    topics: np.ndarray | None = None  # (N,) the generating topic, when there is one

    def __len__(self) -> int:
        return len(self.prompt_lens)

    def decode_sets(self) -> np.ndarray:
        """(N, L, E) bool: the experts each request's decode tokens pick (for calibration)."""
        num_layers = self.prefill_counts.shape[1]
        out = np.zeros((len(self), num_layers, self.num_experts), dtype=bool)
        layer = np.arange(num_layers)[None, :, None]
        for i in range(len(self)):
            out[i, layer, self.decode_picks(i)] = True
        return out


def _distinct(rng: np.random.Generator, pool_size: int, counts: np.ndarray) -> np.ndarray:
    """Per row r, counts[r] distinct ints of [0, pool_size), uniform; -1 pads to max(counts)."""
    width = int(counts.max(initial=0))
    valid = np.arange(width)[None] < counts[:, None]
    if pool_size <= 4 * width:  # dense: random keys, first ``width`` of a permutation
        keys = rng.random((len(counts), pool_size), dtype=np.float32)
        x = np.argsort(keys, axis=1)[:, :width]
    else:  # sparse: draw, then redraw the later of any two equal entries until none
        x = rng.integers(pool_size, size=(len(counts), width))
        later = np.triu(np.ones((width, width), dtype=bool), 1)[None]
        while True:
            dup = ((x[:, :, None] == x[:, None, :]) & later).any(1) & valid
            if not dup.any():
                break
            x[dup] = rng.integers(pool_size, size=int(dup.sum()))
    return np.where(valid, x, -1)


@dataclass
class TopicModel:
    """Topic -> expert preference; see the module docstring."""

    num_layers: int
    num_experts: int
    top_k: int
    num_topics: int
    affinity: float
    preferred: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.top_k <= self.preferred <= self.num_experts - self.top_k:
            raise ValueError("need top_k <= preferred <= num_experts - top_k")
        if not 0.0 <= self.affinity <= 1.0:
            raise ValueError("affinity must be in [0, 1]")
        rng = np.random.default_rng(self.seed + 7)
        order = np.argsort(rng.random((self.num_topics, self.num_layers, self.num_experts)), -1)
        self.sets = order[..., : self.preferred]  # (Z, L, S) preferred experts
        self.others = order[..., self.preferred :]  # (Z, L, E - S) the rest

    def tokens(self, rng: np.random.Generator, topic: int, num_tokens: int) -> np.ndarray:
        """(T, L, k) expert ids of ``num_tokens`` tokens of ``topic``."""
        rows, s = num_tokens * self.num_layers, self.preferred
        m = rng.binomial(self.top_k, self.affinity, size=rows)
        a = _distinct(rng, s, m)
        b = _distinct(rng, self.num_experts - s, self.top_k - m)
        layer = np.tile(np.arange(self.num_layers), num_tokens)[:, None]
        a = np.where(a >= 0, self.sets[topic][layer, np.maximum(a, 0)], -1)
        b = np.where(b >= 0, self.others[topic][layer, np.maximum(b, 0)], -1)
        picks = np.sort(np.concatenate([a, b], axis=1), axis=1)[:, -self.top_k :]  # pads first
        return picks.reshape(num_tokens, self.num_layers, self.top_k).astype(np.int16)

    def prompt_counts(self, rng: np.random.Generator, topic: int, num_tokens: int) -> np.ndarray:
        """(L, E) top-k counts of a prompt of ``num_tokens`` tokens of ``topic``."""
        e, s = self.num_experts, self.preferred
        counts = np.zeros((self.num_layers, e), dtype=np.int32)
        picks = num_tokens * self.top_k
        for l in range(self.num_layers):
            inside = rng.binomial(picks, self.affinity)
            counts[l, self.sets[topic, l]] = rng.multinomial(inside, np.full(s, 1 / s))
            counts[l, self.others[topic, l]] = rng.multinomial(
                picks - inside, np.full(e - s, 1 / (e - s))
            )
        return counts

    def requests(
        self, prompt_lens: np.ndarray, output_lens: np.ndarray, seed: int
    ) -> ExpertRequests:
        """One request per (prompt, output) length, topics uniform at random."""
        rng = np.random.default_rng(seed)
        topics = rng.integers(self.num_topics, size=len(prompt_lens))
        counts = np.stack(
            [
                self.prompt_counts(rng, int(z), int(p))
                for z, p in zip(topics, prompt_lens, strict=True)
            ]
        )
        outs = np.asarray(output_lens)

        def decode(i: int) -> np.ndarray:
            r = np.random.default_rng((seed, i))
            return self.tokens(r, int(topics[i]), max(int(outs[i]) - 1, 1))

        return ExpertRequests(
            counts, np.asarray(prompt_lens), outs, decode, self.num_experts, topics
        )

    def locality(self, num_tokens: int, num_prompts: int = 200) -> dict:
        """README-style locality of this model on prompts of ``num_tokens`` tokens."""
        rng = np.random.default_rng(self.seed + 11)
        halves = []
        for _ in range(num_prompts):
            z = int(rng.integers(self.num_topics))
            halves.append([self.prompt_counts(rng, z, num_tokens // 2) for _ in range(2)])
        return locality([h[0] for h in halves], [h[1] for h in halves], self.seed)


def counts_of(tokens: np.ndarray, num_experts: int) -> np.ndarray:
    """(L, E) top-k counts of (T, L, k) picks."""
    num_layers = tokens.shape[1]
    counts = np.zeros((num_layers, num_experts), dtype=np.int32)
    layer = np.broadcast_to(np.arange(num_layers)[None, :, None], tokens.shape)
    np.add.at(counts, (layer, tokens.astype(np.int64)), 1)
    return counts


def load_trace_prompts(path: str, min_tokens: int = 4) -> tuple[list[np.ndarray], int]:
    """The trace's prompts as (T, L, k) picks, BOS dropped, at least ``min_tokens`` long."""
    data = np.load(path)
    experts, offsets = data["experts"], data["offsets"]
    prompts = [experts[offsets[i] + 1 : offsets[i + 1]] for i in range(len(offsets) - 1)]
    return [p for p in prompts if len(p) >= min_tokens], int(data["num_experts"])


def trace_requests(
    prompts: list[np.ndarray], num_experts: int, output_lens: np.ndarray
) -> ExpertRequests:
    """Requests from real prompts: first half the prefill, second half the decode tokens,
    cycled to ``output_lens`` - 1 decode steps."""
    counts = np.stack([counts_of(t[: len(t) // 2], num_experts) for t in prompts])
    outs = np.asarray(output_lens)

    def decode(i: int) -> np.ndarray:
        dec = prompts[i][len(prompts[i]) // 2 :]
        steps = max(int(outs[i]) - 1, 1)
        return np.tile(dec, (-(-steps // len(dec)), 1, 1))[:steps].astype(np.int16)

    lens = np.asarray([len(t) // 2 for t in prompts])
    return ExpertRequests(counts, lens, outs, decode, num_experts)


def trace_locality(prompts: list[np.ndarray], num_experts: int, min_tokens: int = 16) -> dict:
    """README-style locality of real prompts of at least ``min_tokens`` tokens."""
    ps = [p for p in prompts if len(p) >= min_tokens]
    first = [counts_of(p[: len(p) // 2], num_experts) for p in ps]
    second = [counts_of(p[len(p) // 2 :], num_experts) for p in ps]
    return locality(first, second)
