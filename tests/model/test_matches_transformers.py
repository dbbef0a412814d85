"""Greedy tokens and logits of the single-device engine against transformers' own classes."""

from __future__ import annotations

import pytest
import torch

from moebius import LLM, SamplingParams
from tests.conftest import PROMPTS, hf_greedy

MAX_NEW = 24


@pytest.mark.parametrize("which", ["qwen_dir", "mixtral_dir", "qwen_fused_dir"])
def test_greedy_tokens_equal_transformers(which, request):
    model_dir = request.getfixturevalue(which)
    llm = LLM(model_dir, max_num_batched_tokens=64)  # small budget: chunked prefill in play
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    ref, _ = hf_greedy(model_dir, ids, MAX_NEW)
    outs = llm.generate(ids, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True))
    for o, r in zip(outs, ref, strict=True):
        assert o.outputs[0].token_ids == r
    llm.shutdown()


def test_logits_close_to_transformers(qwen_dir):
    """Prefill logits of the last prompt token: max relative error is reported and bounded."""
    llm = LLM(qwen_dir)
    ids = llm.tokenizer.encode(PROMPTS[1])
    _, model = hf_greedy(qwen_dir, [ids[:2]], 1)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, -1]
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, logprobs=5))[0]
    ours = out.outputs[0].logprobs[0]
    ref_lp = torch.log_softmax(ref, -1)
    errs = [
        abs(lp.logprob - float(ref_lp[t])) / max(abs(float(ref_lp[t])), 1e-6)
        for t, lp in ours.items()
    ]
    print(f"max relative logprob error vs transformers: {max(errs):.2e}")
    assert max(errs) < 1e-4
    assert out.outputs[0].token_ids[0] == int(ref.argmax())
