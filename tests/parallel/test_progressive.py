"""Progressive switches (a few layers per step, layers of both layouts in one step) over gloo:
tokens equal a run without a switch, in both directions, from random steps, reversed half-way,
with preemption; the bytes moved add up to a whole switch's."""

from __future__ import annotations

import random

import pytest

from moebius import LLM, SamplingParams
from tests.conftest import PROMPTS

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
UNEVEN = PROMPTS + ["a", "Science, history, music, art, code, mathematics and sport are topics."]


def tokens(llm):
    ids = [llm.tokenizer.encode(p) for p in UNEVEN]
    return [o.outputs[0].token_ids for o in llm.generate(ids, GREEDY)]


@pytest.fixture(scope="module")
def reference(qwen_dir):
    with LLM(qwen_dir) as llm:
        return tokens(llm)


_rng = random.Random(11)
CASES = [
    ("tp", [(_rng.randrange(1, 8), "ep")], 1),
    ("ep", [(_rng.randrange(1, 8), "tp")], 1),
    ("tp", [(_rng.randrange(1, 6), "ep")], 3),
    ("tp", [(3, "ep"), (5, "tp")], 1),  # reversed half-way: two layers moved, then back
    ("ep", [(2, "tp"), (4, "ep"), (9, "tp")], 1),  # reversed, then a second switch
]


@pytest.mark.parametrize("layout,schedule,per_step", CASES)
def test_progressive_switch_keeps_tokens(layout, schedule, per_step, reference, qwen_dir):
    with LLM(
        qwen_dir,
        ranks=2,
        layout=layout,
        switch_schedule=schedule,
        progressive_layers=per_step,
        max_num_batched_tokens=24,
    ) as llm:
        assert tokens(llm) == reference
        eng = llm.engine
        assert eng.scheduler.transition is None and eng.switches
        full = eng.expected_switch_weight_bytes()
        for rec in eng.switches:
            assert rec.weight_bytes % (full // 4) == 0  # whole layers only (4 MoE layers)
        if len(schedule) == 1:  # one clean switch: exactly a whole switch's expert bytes
            assert eng.switches[0].weight_bytes == full and eng.layout == schedule[0][1]


def test_progressive_there_and_back_restores_weights(qwen_dir):
    with LLM(qwen_dir, ranks=2, layout="tp", progressive_layers=1) as llm:
        eng = llm.engine
        digest = eng.executor.call("weights_digest")
        eng.switch("ep")
        tokens(llm)
        assert eng.layout == "ep"
        eng.switch("tp")
        tokens(llm)
        assert eng.layout == "tp"
        assert eng.executor.call("weights_digest") == digest


def test_progressive_switch_with_preemption(reference, qwen_dir):
    with LLM(
        qwen_dir,
        ranks=2,
        layout="ep",
        num_kv_blocks=16,
        block_size=4,
        progressive_layers=2,
        switch_schedule=[(4, "tp"), (12, "ep")],
    ) as llm:
        assert tokens(llm) == reference
        assert llm.engine.scheduler.num_preemptions > 0


SHORT = [
    SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)
    for m in (2, 3, 9, 4, 12, 5, 7, 3)[: len(UNEVEN)]
]


@pytest.mark.parametrize("schedule", [[(2, "ep")], [(2, "ep"), (4, "tp")]], ids=["on", "reversed"])
def test_progressive_switch_admits_requests(schedule, qwen_dir):
    """Two slots, short requests: slots free up while the switch is in flight and waiting
    requests are admitted mid-switch (tables in both views, whole prompt computed); tokens
    equal a single-device run, reversal included."""
    with LLM(qwen_dir) as llm:
        ids = [llm.tokenizer.encode(p) for p in UNEVEN]
        ref = [o.outputs[0].token_ids for o in llm.generate(ids, SHORT)]
    with LLM(qwen_dir, ranks=2, layout="tp", switch_schedule=schedule, progressive_layers=1,
             max_num_seqs=2, max_num_batched_tokens=24) as llm:
        out = [o.outputs[0].token_ids for o in llm.generate(ids, SHORT)]
        assert llm.engine.scheduler.num_admitted_mid_switch > 0
        assert llm.engine.scheduler.transition is None
    assert out == ref


def test_progressive_reversal_keeps_the_prefix_cache_sound(qwen_dir):
    """A's blocks are cached; a switch moves two layers of a running request's KV through the
    other view (rewriting those bytes) and is reversed; then a prompt equal to A's must not
    reuse A's now-stale cached blocks: the primary view's prefix cache starts over at a
    progressive switch."""
    a = "Science, history, music, art, code, mathematics and sport are topics of many talks."
    c = "Write a very long story about a dragon who learned to paint with many colors."
    long = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    with LLM(qwen_dir) as llm:
        ref_a = tokens_of(llm, a, GREEDY)
    with LLM(qwen_dir, ranks=2, layout="tp", progressive_layers=1, num_kv_blocks=40,
             block_size=4) as llm:
        eng = llm.engine
        assert tokens_of(llm, a, GREEDY) == ref_a  # A's prompt blocks are now cached
        eng.add_request(llm.tokenizer.encode(c), long, "c")
        for _ in range(3):
            eng.step()
        eng.switch("ep")
        for _ in range(3):  # two layers move with C's KV rewritten through the EP view
            eng.step()
        eng.switch("tp")  # reversed half-way
        while eng.scheduler.transition is not None:
            eng.step()
        assert tokens_of(llm, a, GREEDY) == ref_a
        eng.abort("c")


def tokens_of(llm, prompt, params):
    return llm.generate([llm.tokenizer.encode(prompt)], params)[0].outputs[0].token_ids
