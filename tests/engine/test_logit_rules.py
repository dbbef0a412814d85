"""logit_bias (OpenAI's) and allowed_token_ids (vLLM's) against an independent reference:
transformers' own model class generating greedily with a logits processor that keeps the
allowed tokens and adds the bias, then its own repetition penalty (vLLM's order), token for
token; in one batch with requests that set neither (their tokens unchanged), with overlapped
steps and on two ranks through switches. Sampled tokens stay among the allowed ones; the
runner's order and logprobs against hand-computed logits; bad values and ids refused. On a
GPU the fused (Triton) draw sees the same logits as the CPU's eager one."""

from __future__ import annotations

import math

import pytest
import torch

from moebius import LLM, SamplingParams
from moebius.core import SamplingError
from moebius.engine.messages import SampledToken, SeqWork
from moebius.engine.model_runner import ModelRunner
from tests.conftest import PROMPTS, hf_greedy, token_ids

MAX_NEW = 12
TOKEN = 7  # pushed by +100: greedy writes it every step
RULES = [
    dict(logit_bias={TOKEN: 100.0}),
    dict(allowed_token_ids=[3, 50, 120, 200, 333]),
    dict(logit_bias={t: -100.0 for t in range(0, 384, 2)}),  # odd tokens only, in effect
    dict(allowed_token_ids=list(range(100, 300)), logit_bias={150: 3.0, 151: -2.5},
         repetition_penalty=1.5),
]
GREEDY = dict(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


class _Rules:
    """transformers LogitsProcessor: -inf outside ``allowed``, then + ``bias``."""

    def __init__(self, allowed, bias) -> None:
        self.allowed, self.bias = allowed, bias or {}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        if self.allowed is not None:
            keep = torch.zeros_like(scores, dtype=torch.bool)
            keep[:, self.allowed] = True
            scores = scores.masked_fill(~keep, float("-inf"))
        for t, b in self.bias.items():
            scores[:, t] += b
        return scores


@pytest.fixture(scope="module")
def reference(qwen_dir):
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    from moebius.tokenizer import Tokenizer

    tok = Tokenizer(qwen_dir)
    prompts = [tok.encode(p) for p in PROMPTS * 2]  # RULES on even rows
    rules = [RULES[i // 2] if i % 2 == 0 else {} for i in range(len(prompts))]
    gen = []
    for rule in rules:
        procs = [_Rules(rule.get("allowed_token_ids"), rule.get("logit_bias"))]
        if rule.get("repetition_penalty", 1.0) != 1.0:  # after the rules, as vLLM applies it
            procs.append(RepetitionPenaltyLogitsProcessor(rule["repetition_penalty"]))
        gen.append(dict(logits_processor=LogitsProcessorList(procs)))
    want, _ = hf_greedy(qwen_dir, prompts, MAX_NEW, gen)
    params = [SamplingParams(**GREEDY, **rule) for rule in rules]
    return prompts, params, want


@pytest.mark.parametrize("overlap", [False, True])
def test_rules_match_transformers(qwen_dir, reference, overlap):
    prompts, params, want = reference
    with LLM(qwen_dir, async_scheduling=overlap, max_num_batched_tokens=64) as llm:
        got = token_ids(llm.generate(prompts, params))
        plain = token_ids(llm.generate(prompts, SamplingParams(**GREEDY)))
        odd = token_ids(llm.generate(prompts[1::2], SamplingParams(**GREEDY)))  # alone
    assert got == want
    assert got[0] == [TOKEN] * MAX_NEW
    assert set(got[2]) <= set(RULES[1]["allowed_token_ids"])
    assert all(t % 2 for t in got[4]) and set(got[6]) <= set(range(100, 300))
    # the rules change the greedy tokens (the test can fail); the others' stay as alone
    assert all(got[i] != plain[i] for i in range(0, len(prompts), 2))
    assert got[1::2] == plain[1::2] == odd


def test_rules_through_layout_switches(qwen_dir, reference):
    """Two ranks (the rules cross the pipe in the step's message), switching under way."""
    prompts, params, want = reference
    with LLM(qwen_dir, ranks=2, layout="tp", async_scheduling=True,
             switch_schedule=[(3, "ep"), (8, "tp"), (11, "ep")]) as llm:
        assert token_ids(llm.generate(prompts, params)) == want


def test_sampled_tokens_stay_allowed(qwen_dir):
    """Temperature 1 with a seed (and top-p): only allowed tokens, several of them, the same
    again with the same seed; seeded requests without rules in the same batch draw what
    they draw alone."""
    allowed = [5, 9, 200, 301]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    sp = dict(temperature=1.0, max_tokens=MAX_NEW, ignore_eos=True)
    ruled = [SamplingParams(**sp, seed=3, allowed_token_ids=allowed),
             SamplingParams(**sp, seed=4, top_p=0.9, allowed_token_ids=allowed,
                            logit_bias={9: 1.5})]
    plain = SamplingParams(**sp, seed=5)
    with LLM(qwen_dir) as llm:
        got = token_ids(llm.generate(prompts, [*ruled, plain]))
        again = token_ids(llm.generate(prompts[:2], ruled))
        alone = token_ids(llm.generate(prompts[2:], plain))
    for toks in got[:2]:
        assert set(toks) <= set(allowed) and len(set(toks)) >= 2
    assert again == got[:2] and alone == got[2:]
    assert not set(got[2]) <= set(allowed)


def test_chat_takes_the_rules(qwen_dir):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with LLM(qwen_dir) as llm:
        out = llm.chat(messages, SamplingParams(**GREEDY, logit_bias={TOKEN: 100}))[0]
        only = llm.chat(messages, SamplingParams(**GREEDY, allowed_token_ids=[11, 12]))[0]
    assert out.outputs[0].token_ids == [TOKEN] * MAX_NEW
    assert set(only.outputs[0].token_ids) <= {11, 12}


# ---------------------------------------------------------------- the runner's order
def _bare_runner() -> ModelRunner:
    runner = ModelRunner.__new__(ModelRunner)
    runner.device, runner.rank, runner._penalty_counts = torch.device("cpu"), 0, None
    return runner


def _seq(rid: str, **kw) -> SeqWork:
    return SeqWork(rid, kw.pop("token_ids", [1]), 5, [0], True, **kw)


def test_runner_order_against_hand_computed_logits():
    """allowed_token_ids, logit_bias, then the repetition and presence penalties, greedy;
    logprobs of the result (before the temperature). Row 0 worked by hand:
    raw                 [1.0, -2.0, 0.5, 3.0, -1.0, 2.0]
    allowed 1, 2, 3, 5  [-inf, -2.0, 0.5, 3.0, -inf, 2.0]
    bias 1:+3, 3:-1     [-inf, 1.0, 0.5, 2.0, -inf, 2.0]   (0: +50 stays -inf)
    repetition 2 over prompt {1, 3} and outputs {2, 5}: [-inf, 0.5, 0.25, 1.0, -inf, 1.0]
    presence 0.5 over outputs {2, 5}:                   [-inf, 0.5, -0.25, 1.0, -inf, 0.5]
    (penalties before the bias would give [-inf, -1.0, -0.25, 0.5, -inf, 0.5]).
    Row 1 sets nothing but a min_tokens ban; row 2 only a bias, which takes the argmax."""
    raw = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 2.0])
    work = [
        _seq("a", token_ids=[5], output_index=2, num_logprobs=2,
             penalties=(0.5, 0.0, 2.0, [2], [1, 3], 0),
             logit_rules=([1, 2, 3, 5], {1: 3.0, 3: -1.0, 0: 50.0})),
        _seq("b", num_logprobs=1, banned_token_ids=[3]),
        _seq("c", num_logprobs=0, logit_rules=(None, {4: 4.5})),
    ]
    res = _bare_runner()._sample(raw.repeat(3, 1), work, report=True).result()
    inf = float("-inf")
    rows = [[inf, 0.5, -0.25, 1.0, inf, 0.5], [1.0, -2.0, 0.5, inf, -1.0, 2.0],
            [1.0, -2.0, 0.5, 3.0, 3.5, 2.0]]
    want = torch.log_softmax(torch.tensor(rows), -1)
    assert [t.token_id for t in res.tokens] == [3, 5, 4]
    for tok, lp, n in zip(res.tokens, want, (2, 1, 0), strict=True):
        assert isinstance(tok, SampledToken)
        assert math.isclose(tok.logprob, float(lp[tok.token_id]), abs_tol=1e-6)
        top = lp.topk(n)
        assert list(tok.top_logprobs) == top.indices.tolist()
        assert torch.allclose(torch.tensor(list(tok.top_logprobs.values())), top.values)


def test_masked_top_logprobs_are_minus_inf():
    work = [_seq("a", num_logprobs=3, logit_rules=([2], None))]
    res = _bare_runner()._sample(torch.randn(1, 6), work, report=True).result()
    tok = res.tokens[0]
    assert tok.token_id == 2 and tok.logprob == 0.0
    assert sorted(tok.top_logprobs.values())[:2] == [float("-inf")] * 2


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize("kw,match", [
    (dict(logit_bias={1: 100.5}), r"logit_bias values must be in \[-100, 100\]"),
    (dict(logit_bias={1: float("nan")}), "logit_bias values"),
    (dict(logit_bias={-1: 1.0}), "logit_bias keys must be token ids"),
    (dict(logit_bias={"5": 1.0}), "logit_bias keys must be token ids"),
    (dict(logit_bias={1: True}), "logit_bias values"),
    (dict(logit_bias={t: 1.0 for t in range(1025)}), "at most 1024"),
    (dict(logit_bias=[1, 2]), "logit_bias must map"),
    (dict(allowed_token_ids=[]), "allowed_token_ids must be a non-empty list"),
    (dict(allowed_token_ids=[3, -1]), "allowed_token_ids must be a non-empty list"),
    (dict(allowed_token_ids="abc"), "allowed_token_ids must be a non-empty list"),
])
def test_bad_rules_are_sampling_errors(kw, match):
    with pytest.raises(SamplingError, match=match):
        SamplingParams(**kw)


def test_rules_normalized():
    sp = SamplingParams(logit_bias={}, allowed_token_ids=(9, 3, 9))
    assert sp.logit_bias is None and sp.allowed_token_ids == [3, 9]
    assert SamplingParams(logit_bias={4: -2}).logit_bias == {4: -2.0}


def test_engine_refuses_ids_outside_the_vocabulary(qwen_dir):
    with LLM(qwen_dir) as llm:
        vocab = llm.engine.cfg.model.vocab_size
        eos = llm.engine.scheduler.eos_ids
        bad = [dict(logit_bias={vocab: 1.0}), dict(allowed_token_ids=[1, vocab]),
               dict(stop_token_ids=[vocab + 5])]
        for kw in bad:
            with pytest.raises(SamplingError, match=rf"in \[0, {vocab}\)"):
                llm.generate(["Hello", "Hi"], [SamplingParams(max_tokens=2),
                                               SamplingParams(max_tokens=2, **kw)])
        with pytest.raises(SamplingError, match="only stop tokens"):
            llm.generate("Hello", SamplingParams(allowed_token_ids=list(eos), min_tokens=2))
        assert not llm.engine.has_unfinished()  # the good prompt before the bad one went
        out = llm.generate("Hello", SamplingParams(**GREEDY, logit_bias={vocab - 1: 100}))
        assert out[0].outputs[0].token_ids == [vocab - 1] * MAX_NEW


# ---------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fused_sampling_sees_the_rules(qwen_dir, reference):
    """On CUDA the draw is Triton's (sampler.FUSED_DRAW / FUSED_FILTER): greedy rules give
    the reference tokens; sampled ones (plain, top-p, top-k) the CPU's eager draws."""
    prompts, params, want = reference
    allowed = list(range(0, 384, 5))
    sp = dict(temperature=1.0, max_tokens=MAX_NEW, ignore_eos=True, allowed_token_ids=allowed)
    sampled = [SamplingParams(**sp, seed=1), SamplingParams(**sp, seed=2, top_p=0.8),
               SamplingParams(**sp, seed=3, top_k=4, logit_bias={10: 2.0, 15: -3.0})]
    with (LLM(qwen_dir) as cpu,
          LLM(qwen_dir, device="cuda", dtype="float32", num_kv_blocks=256) as gpu):
        assert token_ids(gpu.generate(prompts, params)) == want
        a = token_ids(cpu.generate(prompts[:3], sampled))
        b = token_ids(gpu.generate(prompts[:3], sampled))
    assert a == b and all(set(t) <= set(allowed) for t in b)
