"""Shared fixtures: tiny random checkpoints written once per session, and the transformers
reference generation."""

from __future__ import annotations

import pytest
import torch

from moebius.model.tiny import write_tiny_checkpoint

PROMPTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. A mixture of experts",
    "def add(a, b):",
    "What is the capital of France? Paris is the capital of France. Numbers: 0 1 2 3 4 5 6 7",
]


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("qwen")), "qwen3_moe", seed=1)


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory):
    return write_tiny_checkpoint(
        str(tmp_path_factory.mktemp("mixtral")), "mixtral", seed=2, num_shards=3
    )


@pytest.fixture(scope="session")
def qwen_fused_dir(tmp_path_factory):
    return write_tiny_checkpoint(
        str(tmp_path_factory.mktemp("qwenfused")),
        "qwen3_moe",
        seed=1,
        fused_experts=True,
        num_shards=2,
    )


def hf_greedy(model_dir: str, prompt_ids: list[list[int]], max_new_tokens: int):
    """Greedy tokens from transformers' own model class, one prompt at a time (no padding)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    outs = []
    for ids in prompt_ids:
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(
                x,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                min_new_tokens=max_new_tokens,
            )
        outs.append(y[0, len(ids) :].tolist())
    return outs, model


def cuda_available() -> bool:
    return torch.cuda.is_available()
