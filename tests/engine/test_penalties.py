"""Penalties against an independent reference: transformers' own model class generating
greedily, with its repetition penalty (prompt and outputs) and a logits processor applying
OpenAI's presence and frequency penalties (outputs only) after it, token for token. In one
batch with requests that set none, with steps overlapped (the newest token still on the
device), through preemption, and on two ranks through live layout switches (the sampling
rank counts each output once: engine/penalty_counts.py)."""

from __future__ import annotations

import pytest
import torch

from moebius import LLM, SamplingParams
from moebius.core import SamplingError
from tests.conftest import PROMPTS, hf_greedy, token_ids

MAX_NEW = 20
PENALTIES = [dict(presence_penalty=0.6, frequency_penalty=0.9),
             dict(repetition_penalty=1.4),
             dict(presence_penalty=-0.4, frequency_penalty=0.0),
             dict(repetition_penalty=0.7, frequency_penalty=0.5),
             dict(presence_penalty=0.0, frequency_penalty=1.5)]


class _OpenAIPenalties:
    """transformers LogitsProcessor: logit - presence·[seen] - frequency·count over the tokens
    generated after ``prompt_len``."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = input_ids[0, self.prompt_len:]
        counts = torch.bincount(out, minlength=scores.shape[-1]).to(scores.dtype)
        return scores - self.presence * (counts > 0) - self.frequency * counts


@pytest.fixture(scope="module")
def reference(qwen_dir):
    from transformers import LogitsProcessorList

    from moebius.tokenizer import Tokenizer

    tok = Tokenizer(qwen_dir)
    prompts = [tok.encode(p) for p in PROMPTS * 2 + PROMPTS[:2]]  # PENALTIES on even rows
    pens = [PENALTIES[i // 2] if i % 2 == 0 else {} for i in range(len(prompts))]
    # transformers runs its repetition penalty before custom processors
    gen = [dict(repetition_penalty=pen.get("repetition_penalty", 1.0),
                logits_processor=LogitsProcessorList([_OpenAIPenalties(
                    len(ids), pen.get("presence_penalty", 0.0),
                    pen.get("frequency_penalty", 0.0))]))
           for ids, pen in zip(prompts, pens, strict=True)]
    want, _ = hf_greedy(qwen_dir, prompts, MAX_NEW, gen)
    params = [SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, **pen)
              for pen in pens]
    return prompts, params, want


@pytest.mark.parametrize("overlap", [False, True])
def test_penalties_match_transformers(qwen_dir, reference, overlap):
    prompts, params, want = reference
    with LLM(qwen_dir, async_scheduling=overlap, max_num_batched_tokens=64) as llm:
        got = token_ids(llm.generate(prompts, params))
        plain = token_ids(llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW,
                                                             ignore_eos=True)))
    assert got == want
    # the penalties change the greedy tokens here (the test can fail)
    assert sum(got[i] != plain[i] for i in range(0, len(prompts), 2)) >= 3
    assert all(got[i] == plain[i] for i in range(1, len(prompts), 2))


def test_penalties_through_preemption(qwen_dir, reference):
    """A KV pool too small for the batch: preempted requests are recomputed and their
    outputs counted again from the start (sent whole), with steps overlapped."""
    prompts, params, want = reference
    with LLM(qwen_dir, async_scheduling=True, num_kv_blocks=24, block_size=4,
             enable_prefix_caching=False) as llm:
        assert token_ids(llm.generate(prompts, params)) == want
        assert llm.engine.scheduler.num_preemptions > 0


def test_each_output_crosses_once(qwen_dir, reference, monkeypatch):
    """A decoding penalised sequence's message carries only the outputs since its last count
    (one or two a step), not its whole history; the prompt only when counting starts."""
    from moebius.engine.penalty_counts import PenaltyCounts

    prompts, params, want = reference
    parts, original = [], PenaltyCounts.update

    def record(self, rids, step_parts, h2d):
        parts.extend(step_parts)
        return original(self, rids, step_parts, h2d)

    monkeypatch.setattr(PenaltyCounts, "update", record)
    with LLM(qwen_dir, async_scheduling=True) as llm:
        assert token_ids(llm.generate(prompts, params)) == want
    deltas = [(len(outputs), len(prompt)) for outputs, prompt, counted in parts if counted]
    assert len(deltas) > len(parts) // 2
    assert max(n for n, _ in deltas) <= 2 and not any(p for _, p in deltas)


@pytest.mark.parametrize("progressive", [0, 1])
def test_penalties_through_layout_switches(qwen_dir, reference, progressive):
    prompts, params, want = reference
    with LLM(qwen_dir, ranks=2, layout="tp", async_scheduling=True,
             progressive_layers=progressive,
             switch_schedule=[(3, "ep"), (8, "tp"), (13, "ep")]) as llm:
        assert token_ids(llm.generate(prompts, params)) == want


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_penalties_on_cuda_match_transformers(qwen_dir, reference):
    """The device-side counts (pinned copies, accumulating index_put) on a GPU, float32,
    steps overlapped and in CUDA graphs."""
    prompts, params, want = reference
    with LLM(qwen_dir, device="cuda", dtype="float32", num_kv_blocks=256) as llm:
        assert token_ids(llm.generate(prompts, params)) == want


@pytest.mark.parametrize("kw", [dict(presence_penalty=2.5), dict(frequency_penalty=-3),
                                dict(repetition_penalty=0), dict(repetition_penalty=11)])
def test_penalties_out_of_range(kw):
    with pytest.raises(SamplingError, match="penalty"):
        SamplingParams(**kw)
