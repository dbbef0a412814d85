"""Overlapped (async) scheduling: step N+1 is scheduled and launched before step N's tokens
reach the host, its decode inputs read on the device. Whatever the mix (greedy, seeded
sampling, n > 1, EOS, stop ids and strings, min/max tokens, logprobs, preemption in a tiny
pool, chunked prefill, prefix hits, aborts mid-flight), the outputs equal the synchronous
engine's, and nothing leaks (blocks, in-flight counts)."""

from __future__ import annotations

import pytest

from moebius import LLM, SamplingParams
from tests.conftest import PROMPTS


def outputs(llm, prompts, params):
    out = llm.generate(prompts, params)
    return [(c.token_ids, c.text, c.finish_reason, c.stop_reason,
             None if c.logprobs is None else [{k: v.logprob for k, v in d.items()}
                                              for d in c.logprobs])
            for o in out for c in o.outputs]


def mixed_params(llm):
    base = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12,
                                                   ignore_eos=True))[0].outputs[0]
    stop_tok, stop_text = base.token_ids[4], base.text[len(base.text) // 2:][:2]
    return [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_tok]),
        SamplingParams(temperature=0, max_tokens=12, stop=[stop_text] if stop_text else []),
        SamplingParams(temperature=0.9, top_p=0.9, top_k=20, seed=5, max_tokens=9, logprobs=2),
        SamplingParams(temperature=1.0, seed=1, n=3, max_tokens=7, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=1),
        SamplingParams(temperature=0.7, seed=2, min_tokens=5, max_tokens=10),
        SamplingParams(temperature=0, max_tokens=20),  # may stop on EOS
    ]


PROMPT_SET = PROMPTS + [PROMPTS[0] * 3, "a"]


@pytest.mark.parametrize("kw", [
    {},
    {"num_kv_blocks": 14, "block_size": 4, "enable_prefix_caching": False},  # preempts
    {"max_num_batched_tokens": 16},  # chunked prefill
])
def test_overlapped_steps_give_the_synchronous_outputs(qwen_dir, kw):
    with LLM(qwen_dir, async_scheduling=False, **kw) as sync:
        params = mixed_params(sync)
        prompts = [PROMPT_SET[i % len(PROMPT_SET)] for i in range(len(params))]
        want = outputs(sync, prompts, params)
    with LLM(qwen_dir, async_scheduling=True, **kw) as overlapped:
        assert overlapped.engine._overlap
        assert outputs(overlapped, prompts, params) == want
        s = overlapped.engine.scheduler
        assert not s.running and not s.waiting and overlapped.engine._inflight is None
        assert all(m.usage() == 0 or m.caching for m in s.managers)
        if "num_kv_blocks" in kw:
            assert s.num_preemptions > 0


def test_an_abort_with_a_token_in_flight(qwen_dir):
    """Aborted between launch and landing: reported once, finished "abort", its in-flight
    token dropped; the others are unaffected and every block comes back."""
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    with LLM(qwen_dir, async_scheduling=True, enable_prefix_caching=False) as llm:
        want = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:3], sp)]
        eng = llm.engine
        ids = [eng.add_request(eng.tokenizer.encode(p), sp) for p in PROMPTS[:3]]
        finals = {}
        for _ in range(4):
            for o in eng.step():
                finals[o.request_id] = o
        assert eng._inflight is not None
        eng.abort(ids[1])
        while eng.has_unfinished():
            for o in eng.step():
                assert o.request_id not in finals or not finals[o.request_id].finished
                finals[o.request_id] = o
        assert finals[ids[1]].outputs[0].finish_reason == "abort"
        got = finals[ids[1]].outputs[0].token_ids
        assert got == want[1][: len(got)] and len(got) < 10
        for i in (0, 2):
            assert finals[ids[i]].outputs[0].token_ids == want[i]
        assert all(m.usage() == 0 for m in eng.scheduler.managers)


def test_cuda_default_and_cpu_default():
    from moebius.config import EngineConfig, preset

    m = preset("qwen3-30b-a3b", num_hidden_layers=1)
    assert EngineConfig(model=m, device="cuda").overlap_steps
    assert not EngineConfig(model=m, device="cpu").overlap_steps
    assert EngineConfig(model=m, device="cuda", ranks=2).overlap_steps
    assert not EngineConfig(model=m, device="cuda", async_scheduling=False).overlap_steps


@pytest.mark.parametrize("kw", [
    {"layout": "tp", "switch_schedule": ((3, "ep"), (7, "tp"), (11, "ep"))},
    {"layout": "ep", "num_kv_blocks": 24, "block_size": 4, "enable_prefix_caching": False},
    {"layout": "tp", "switch_schedule": ((2, "ep"),), "progressive_layers": 1},
])
def test_overlapped_steps_on_two_ranks(qwen_dir, kw):
    """Two gloo ranks: launches queue on the rank processes (pipes keep the order); under TP
    every rank samples its own copy of the tokens; switches land the step in flight first."""
    with LLM(qwen_dir, ranks=2, async_scheduling=False, **kw) as sync:
        params = mixed_params(sync)
        prompts = [PROMPT_SET[i % len(PROMPT_SET)] for i in range(len(params))]
        want = outputs(sync, prompts, params)
        sync_switches = len(sync.engine.switches)
    with LLM(qwen_dir, ranks=2, async_scheduling=True, **kw) as overlapped:
        assert overlapped.engine._overlap
        got = outputs(overlapped, prompts, params)
        # the switches fall a step apart, so a step's batch meets a layout at another time:
        # tokens equal, logprobs to float32 rounding (TP's all-reduce vs EP's whole experts)
        assert [g[:4] for g in got] == [w[:4] for w in want]
        for g, w in zip(got, want, strict=True):
            for dg, dw in zip(g[4] or [], w[4] or [], strict=True):
                assert dg.keys() == dw.keys()
                assert all(abs(dg[k] - dw[k]) < 1e-4 for k in dg)
        assert len(overlapped.engine.switches) == sync_switches
        assert overlapped.engine._inflight is None
        if "num_kv_blocks" in kw:
            assert overlapped.engine.scheduler.num_preemptions > 0


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_overlapped_graph_steps_on_cuda(qwen_dir):
    """bf16 decode graphs: the in-flight tokens are scattered into the graph's input buffer
    on the device; outputs equal the synchronous engine's."""
    kw = dict(device="cuda", dtype="bfloat16", kv_cache_memory=1 << 30, max_num_seqs=16)
    with LLM(qwen_dir, async_scheduling=False, **kw) as sync:
        params = mixed_params(sync)
        prompts = [PROMPT_SET[i % len(PROMPT_SET)] for i in range(len(params))]
        want = outputs(sync, prompts, params)
    with LLM(qwen_dir, **kw) as overlapped:
        assert overlapped.engine._overlap and overlapped.engine.memory[0]["graph_buckets"]
        assert outputs(overlapped, prompts, params) == want
