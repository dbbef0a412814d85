"""The scheduler alone (ids and lists, no model): chunked prefill under the token budget, the
prefix cache (and a scored prompt skipping it), paused admission, preemption when the KV pool
runs out, and the two policies' orders: fcfs (arrival, the latest admitted preempted) and
priority (lower first, the lowest preempted, never one preempted to admit another)."""

from __future__ import annotations

import itertools

import pytest

from moebius.config import ConfigError, EngineConfig, ModelConfig
from moebius.core import Request, RequestStatus, SamplingParams
from moebius.engine.messages import SampledToken
from moebius.engine.scheduler import Scheduler

_clock = itertools.count()


@pytest.fixture(scope="module")
def model(qwen_dir) -> ModelConfig:
    return ModelConfig.from_dir(qwen_dir)


def scheduler(model, blocks=64, policy="fcfs", **cfg) -> Scheduler:
    cfg = EngineConfig(model=model, block_size=4, max_num_batched_tokens=16,
                       scheduling_policy=policy, **cfg)
    return Scheduler(cfg, {"ep": blocks, "tp": blocks})


def request(n_prompt: int, priority: int = 0, first: int = 0, **params) -> Request:
    req = Request(f"r{next(_clock)}", list(range(first, first + n_prompt)),
                  SamplingParams(max_tokens=params.pop("max_tokens", 8), ignore_eos=True,
                                 **params), seed=0, arrival_time=float(next(_clock)))
    req.priority = priority
    if req.params.prompt_logprobs is not None:
        req.prompt_logprobs = [None] * n_prompt
    return req


def step(s: Scheduler):
    """Schedule a step, sample token 7 for every request that samples; the items."""
    batch = s.schedule()
    tokens = {}
    for w in batch.inputs[0].seqs:
        if w.sample:
            tokens[w.request_id] = SampledToken(w.request_id, 7)
    s.update(batch, tokens)
    return [(r.request_id, n) for r, n in batch.items]


def test_chunked_prefill_shares_the_token_budget(model):
    s = scheduler(model)
    long, short = request(30), request(3)
    s.add(long)
    s.add(short)
    assert step(s) == [(long.request_id, 16)]  # the budget is spent on the first prompt
    assert step(s) == [(long.request_id, 14), (short.request_id, 2)]
    assert step(s) == [(long.request_id, 1), (short.request_id, 1)]
    assert long.output_token_ids == [7, 7] and short.output_token_ids == [7]


def test_prefix_cache_hits_unless_the_prompt_is_scored(model):
    s = scheduler(model)
    first = request(12)
    s.add(first)
    step(s)
    again, scored = request(12), request(12, prompt_logprobs=1)
    s.add(again)
    s.add(scored)
    step(s)
    assert again.num_cached_tokens == 8  # two full blocks of 4 (the last token recomputes)
    assert scored.num_cached_tokens == 0
    assert (s.num_prefix_hits, s.num_prefix_queries) == (8, 36)


def test_paused_admission(model):
    s = scheduler(model)
    running, held = request(4), request(4)
    s.add(running)
    step(s)
    s.paused = True
    s.add(held)
    assert step(s) == [(running.request_id, 1)]
    s.paused = False
    assert [rid for rid, _ in step(s)] == [running.request_id, held.request_id]


def test_fcfs_preempts_the_latest_admitted(model):
    s = scheduler(model, blocks=6)  # 24 tokens
    a, b = request(8, max_tokens=20), request(8, max_tokens=20)
    s.add(a)
    s.add(b)
    step(s)  # both admitted: 4 blocks
    for _ in range(10):
        step(s)
        if s.num_preemptions:
            break
    assert b.status == RequestStatus.PREEMPTED and a.status == RequestStatus.RUNNING
    assert s.waiting[0] is b


def test_priority_orders_admission_and_preemption(model):
    """Every step: the waiting list in (priority, arrival) order, the running list too, and
    each request preempted no better than every one left running."""
    s = scheduler(model, blocks=6, policy="priority", max_num_seqs=2)
    low, mid, high = request(8, 5, max_tokens=20), request(8, 1, max_tokens=20), request(4, 0)
    for r in (low, mid, high):
        s.add(r)
    assert s.waiting == type(s.waiting)([high, mid, low])  # high arrived last, goes first
    victims = []
    for _ in range(60):
        before = s.num_preemptions
        step(s)
        for q in (s.waiting, s.running):
            keys = [(r.priority, r.arrival_time) for r in q]
            assert keys == sorted(keys)
        if s.num_preemptions > before:
            out = [r for r in (low, mid, high) if r.status == RequestStatus.PREEMPTED]
            assert max(r.priority for r in s.running) <= min(r.priority for r in out)
            victims += [r.priority for r in out]
        if not s.has_work():
            break
    assert not s.has_work() and victims[:2] == [1, 5]  # mid under high, then low under mid


def test_a_low_priority_running_request_is_preempted_first(model):
    """Admitted first (alone), then a better one: under pressure the earlier, lower one goes."""
    s = scheduler(model, blocks=6, policy="priority")
    low = request(8, 3, max_tokens=20)
    s.add(low)
    step(s)
    high = request(8, 0, max_tokens=20)
    s.add(high)
    step(s)
    assert [r.request_id for r in s.running] == [high.request_id, low.request_id]
    while not s.num_preemptions:
        step(s)
    assert low.status == RequestStatus.PREEMPTED and high.status == RequestStatus.RUNNING


def test_policy_is_checked(model):
    with pytest.raises(ConfigError, match="scheduling_policy"):
        EngineConfig(model=model, scheduling_policy="lifo")


def test_engine_priorities(qwen_dir):
    """Through LLM.generate: one sequence at a time, started in priority order; an fcfs
    engine refuses any priority but 0."""
    from moebius import LLM

    prompts = ["a b c", "d e f", "g h i"]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    with LLM(qwen_dir, scheduling_policy="priority", max_num_seqs=1) as llm:
        outs = llm.generate(prompts, params, priority=[2, 0, 1])
    started = [o.metrics["first_scheduled_time"] for o in outs]
    assert started[1] < started[2] < started[0]
    with LLM(qwen_dir) as llm:
        with pytest.raises(ValueError, match="priority scheduling policy"):
            llm.generate(prompts[:1], params, priority=[1])
        assert len(llm.generate(prompts[:1], params, priority=[0])) == 1
