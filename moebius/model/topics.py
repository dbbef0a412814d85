"""Synthetic expert locality for random checkpoints: token embeddings clustered by topic, each
layer's router aligned so a topic's tokens pick that topic's experts, and the output head
aligned so the model continues in the prompt's topic.

Random weights have no locality (every token routes anywhere), so locality-aware routing
cannot be judged on them; real checkpoints do. With ``topics=K`` token t belongs to topic
``t % K`` and expert e to topic ``e % K``. Use ``moebius make-tiny DIR --topics K`` (or
``write_tiny_checkpoint(..., topics=K)``); calibrate ELDR on your own prompts with
``moebius eldr calibrate`` (docs/eldr.md).
"""

from __future__ import annotations

import torch


def topic_of(token_id: int, num_topics: int) -> int:
    return token_id % num_topics


def topic_directions(num_topics: int, hidden: int, seed: int) -> torch.Tensor:
    """(K, H) orthonormal directions, one per topic."""
    g = torch.Generator().manual_seed(seed + 7919)
    q, _ = torch.linalg.qr(torch.randn(hidden, num_topics, generator=g))
    return q.t().contiguous()


def apply_topics(sd: dict, cfg: dict, num_topics: int, seed: int, strength: float = 6.0) -> dict:
    """Rewrite embeddings, routers and the output head of a Qwen3-MoE/Mixtral state dict."""
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    E = cfg.get("num_experts") or cfg["num_local_experts"]
    if num_topics < 2 or num_topics > min(H, E):
        raise ValueError(f"topics must be in [2, min(hidden, experts)] = [2, {min(H, E)}]")
    c = topic_directions(num_topics, H, seed)
    g = torch.Generator().manual_seed(seed + 104729)
    tok_topic = torch.arange(V) % num_topics
    noise = torch.randn(V, H, generator=g) * 0.5
    sd["model.embed_tokens.weight"] = c[tok_topic] * (strength * H**0.5) + noise
    sd["lm_head.weight"] = c[tok_topic] * 2.0 + torch.randn(V, H, generator=g) * 0.05
    exp_topic = torch.arange(E) % num_topics
    for name in list(sd):
        if name.endswith("gate.weight") and sd[name].shape == (E, H):
            sd[name] = c[exp_topic] * 1.5 + torch.randn(E, H, generator=g) * 0.05
    return sd
