"""Synthetic expert locality: tokens of a topic pick that topic's experts and the model
continues in the topic (so locality-aware routing can be exercised without real weights)."""

from __future__ import annotations

import random

import pytest
import torch

from moebius import LLM, SamplingParams
from moebius.model.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def topic_dir(tmp_path_factory):
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("topics")), topics=4, seed=3)


def test_topic_tokens_pick_topic_experts_and_continue_in_topic(topic_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(topic_dir, dtype=torch.float32)
    V, K = model.config.vocab_size, 4
    rng = random.Random(0)
    prompts = []
    for k in range(K):
        ids = [t for t in range(V) if t % K == k]
        x = torch.tensor([[rng.choice(ids) for _ in range(20)]])
        with torch.no_grad():
            logits = model(x, output_router_logits=True).router_logits
        picks = torch.cat([r.topk(2, -1).indices.flatten() for r in logits])
        assert (picks % K == k).float().mean() > 0.9  # random routing: 1/K
        prompts.append(x[0].tolist())
    with LLM(topic_dir) as llm:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for k, out in enumerate(outs):
        toks = out.outputs[0].token_ids
        assert sum(t % K == k for t in toks) / len(toks) > 0.8


def test_topics_bounds(tmp_path):
    with pytest.raises(ValueError, match="topics"):
        write_tiny_checkpoint(str(tmp_path / "bad"), topics=9)  # 8 experts
