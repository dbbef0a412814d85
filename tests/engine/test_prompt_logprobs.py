"""Prompt logprobs (SamplingParams.prompt_logprobs, vLLM's): every prompt token's logprob, rank
and the top n at its position, against transformers' logits of the same checkpoint; through
chunked prefill, the prefix cache, preemption, n > 1 and two ranks in either layout."""

from __future__ import annotations

import pytest
import torch

from moebius import LLM, SamplingParams
from moebius.core import SamplingError
from tests.conftest import PROMPTS

TOP = 3


def hf_prompt_logprobs(model_dir: str, ids: list[int]) -> torch.Tensor:
    """transformers' log-softmax at every prompt position (row p predicts token p + 1)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def check_against(ref: torch.Tensor, ids: list[int], got) -> None:
    assert got[0] is None and len(got) == len(ids)
    for p in range(1, len(ids)):
        row, entry, token = ref[p - 1], got[p], ids[p]
        want = float(row[token])
        assert abs(entry[token].logprob - want) <= 1e-4 * max(abs(want), 1.0), p
        assert entry[token].rank == int((row >= row[token]).sum())
        top = row.topk(TOP)
        for r, (t, v) in enumerate(zip(top.indices.tolist(), top.values.tolist(),
                                       strict=True)):
            assert abs(entry[t].logprob - v) <= 1e-4 * max(abs(v), 1.0)
            if t != token:
                assert entry[t].rank == r + 1
        assert set(entry) == {token, *top.indices.tolist()}


@pytest.mark.parametrize("which", ["qwen_dir", "mixtral_dir"])
def test_prompt_logprobs_match_transformers(which, request):
    """A small token budget: prompts arrive in chunks, each chunk scores its own rows."""
    model_dir = request.getfixturevalue(which)
    with LLM(model_dir, block_size=4, max_num_batched_tokens=8) as llm:
        ids = [llm.tokenizer.encode(p) for p in PROMPTS]
        outs = llm.generate(ids, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=TOP))
    for o, p in zip(outs, ids, strict=True):
        assert len(p) > 8  # really chunked
        check_against(hf_prompt_logprobs(model_dir, p), p, o.prompt_logprobs)


def test_prefix_cache_and_children(qwen_dir):
    """A prompt already in the prefix cache is still scored whole (the cache holds KV, not
    logits), a request without prompt_logprobs still reads the cache, and n > 1 scores once."""
    with LLM(qwen_dir, max_num_batched_tokens=16) as llm:
        ids = llm.tokenizer.encode(PROMPTS[1] * 3)
        plain = SamplingParams(temperature=0, max_tokens=2)
        warm = llm.generate([ids], plain)[0]
        assert warm.prompt_logprobs is None
        scored = SamplingParams(temperature=0.8, max_tokens=3, n=2, seed=1, prompt_logprobs=1)
        out = llm.generate([ids], scored)[0]
        assert out.num_cached_tokens == 0 and len(out.outputs) == 2
        again = llm.generate([ids], plain)[0]
        assert again.num_cached_tokens > 0
    ref = hf_prompt_logprobs(qwen_dir, ids)
    for p in range(1, len(ids)):
        want = float(ref[p - 1, ids[p]])
        assert abs(out.prompt_logprobs[p][ids[p]].logprob - want) <= 1e-4 * max(abs(want), 1)


def test_preempted_request_keeps_its_prompt_logprobs(qwen_dir):
    """A pool too small for every request: preemption recomputes, the scores stay whole."""
    with LLM(qwen_dir, num_kv_blocks=12, block_size=4, max_num_batched_tokens=16) as llm:
        ids = [llm.tokenizer.encode(p) for p in PROMPTS]
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, prompt_logprobs=TOP)
        outs = llm.generate(ids, params)
        assert llm.engine.scheduler.num_preemptions > 0
    for o, p in zip(outs, ids, strict=True):
        check_against(hf_prompt_logprobs(qwen_dir, p), p, o.prompt_logprobs)


def test_one_token_prompt_and_bounds(qwen_dir):
    with LLM(qwen_dir) as llm:
        out = llm.generate([[5]], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
        assert out.prompt_logprobs == [None]
    with pytest.raises(SamplingError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)


@pytest.mark.parametrize("layout", ["tp", "ep"])
def test_two_ranks_match_one(layout, qwen_dir):
    """Under TP rank 0 reports the scores, under EP each owner its own requests'; with
    overlapped steps."""
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=TOP)
    with LLM(qwen_dir, max_num_batched_tokens=16) as llm:
        ids = [llm.tokenizer.encode(p) for p in PROMPTS]
        one = llm.generate(ids, params)
    with LLM(qwen_dir, ranks=2, layout=layout, max_num_batched_tokens=16,
             async_scheduling=True) as llm:
        two = llm.generate(ids, params)
    for a, b in zip(one, two, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True):
            assert list(x) == list(y)
            assert all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)


def test_guided_rows_under_overlapped_steps(qwen_dir):
    """A guided request's mask follows its launch (LATE_MASK): the step's scores travel with
    the late sampling."""
    with LLM(qwen_dir, block_size=4, max_num_batched_tokens=8, async_scheduling=True) as llm:
        ids = [llm.tokenizer.encode(p) for p in PROMPTS]
        guided = SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=TOP,
                                guided_choice=["yes", "no", "maybe"])
        outs = llm.generate(ids, guided)
    for o, p in zip(outs, ids, strict=True):
        assert o.outputs[0].text in ("yes", "no", "maybe")
        check_against(hf_prompt_logprobs(qwen_dir, p), p, o.prompt_logprobs)
