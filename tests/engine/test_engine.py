"""The single-device engine: sampling, stops, n completions, preemption, prefix caching and
errors for bad input."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from moebius import LLM, SamplingParams
from moebius.config import ConfigError, ModelConfig
from moebius.core import SamplingError
from moebius.engine.llm_engine import PromptTooLongError
from tests.conftest import PROMPTS

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(qwen_dir):
    with LLM(qwen_dir) as llm:
        yield llm


def toks(outs):
    return [c.token_ids for o in outs for c in o.outputs]


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    sp = SamplingParams(
        temperature=0.9, top_p=0.9, top_k=50, seed=7, max_tokens=16, ignore_eos=True
    )
    alone = toks(llm.generate(PROMPTS[0], sp))
    batched = toks(llm.generate(PROMPTS, sp))
    assert batched[0] == alone[0]
    assert toks(llm.generate(PROMPTS[0], sp)) == alone
    other = toks(
        llm.generate(
            PROMPTS[0], SamplingParams(temperature=0.9, seed=8, max_tokens=16, ignore_eos=True)
        )
    )
    assert other != alone


def test_n_completions_share_prefix_cache_and_differ(llm):
    sp = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True)
    prompt = PROMPTS[3] * 2
    out = llm.generate(prompt, sp)[0]
    assert len(out.outputs) == 4
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert all(len(c.token_ids) == 8 for c in out.outputs)


def test_prefix_cache_hits_are_counted_and_change_nothing(qwen_dir):
    system = "You are a helpful assistant. " * 6
    prompts = [system + p for p in PROMPTS]
    with LLM(qwen_dir, enable_prefix_caching=False) as cold:
        ref = toks(cold.generate(prompts, GREEDY))
    with LLM(qwen_dir) as warm:
        first = toks(warm.generate(prompts[:1], GREEDY))
        rest = warm.generate(prompts[1:], GREEDY)
        assert first + toks(rest) == ref
        assert all(o.num_cached_tokens >= 16 for o in rest)
        assert warm.engine.stats()["prefix_cache_hit_tokens"] >= 16 * len(rest)


def test_preemption_under_tiny_pool_gives_same_tokens(qwen_dir, llm):
    ref = toks(llm.generate(PROMPTS, GREEDY))
    with LLM(qwen_dir, num_kv_blocks=14, block_size=4, enable_prefix_caching=False) as tiny:
        assert toks(tiny.generate(PROMPTS, GREEDY)) == ref
        assert tiny.engine.scheduler.num_preemptions > 0


def test_chunked_prefill_gives_same_tokens(qwen_dir, llm):
    ref = toks(llm.generate(PROMPTS, GREEDY))
    with LLM(qwen_dir, max_num_batched_tokens=16) as small:
        assert toks(small.generate(PROMPTS, GREEDY)) == ref


def test_stop_strings_tokens_and_lengths(llm):
    base = llm.generate(PROMPTS[0], GREEDY)[0].outputs[0]
    stop_tok = base.token_ids[5]
    out = llm.generate(
        PROMPTS[0], SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_tok])
    )[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == stop_tok
    assert out.token_ids == base.token_ids[: base.token_ids.index(stop_tok) + 1]
    text = base.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if stop:
        out = llm.generate(
            PROMPTS[0], SamplingParams(temperature=0, max_tokens=16, stop=stop, ignore_eos=True)
        )[0].outputs[0]
        assert out.finish_reason == "stop" and out.stop_reason == stop
        assert out.text == text[: text.find(stop)]
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=3))[0].outputs[0]
    assert len(out.token_ids) <= 3


def test_logprobs_on_request(llm):
    out = llm.generate(
        PROMPTS[1], SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True)
    )[0].outputs[0]
    assert len(out.logprobs) == 4
    for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert tok in lp and lp[tok].logprob <= 0
        assert max(lp.values(), key=lambda x: x.logprob).logprob == lp[tok].logprob  # greedy


def test_streamed_logprobs_match_the_final_output(llm):
    """Per-step outputs carry one logprob dict a token and the running sum; a reported output
    keeps its own list (later steps do not grow it); n=2 children keep theirs apart."""
    eng = llm.engine
    sp = SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=6, logprobs=2, ignore_eos=True)
    rid = eng.add_request(eng.tokenizer.encode(PROMPTS[2]), sp)
    seen = []
    while eng.has_unfinished():
        seen += [o for o in eng.step() if o.request_id == rid]
    assert seen and seen[-1].finished
    for out in seen:
        for c in out.outputs:
            assert len(c.logprobs) == len(c.token_ids)
            if c.token_ids:
                want = sum(d[t].logprob for d, t in zip(c.logprobs, c.token_ids, strict=True))
                assert c.cumulative_logprob == pytest.approx(want, abs=1e-9)
    final = seen[-1].outputs
    for out in seen[:-1]:
        for c, f in zip(out.outputs, final, strict=True):
            n = len(c.token_ids)
            assert c.logprobs == f.logprobs[:n] and c.token_ids == f.token_ids[:n]


def test_steps_send_only_the_blocks_appended_since(qwen_dir, monkeypatch):
    """A decoding sequence's message carries only the block-table entries appended since its
    step before; the runner's completed table is the scheduler's, and the tokens are those of
    whole tables sent every step."""
    from moebius.engine import scheduler as sched_mod
    from moebius.engine.model_runner import ModelRunner

    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    with LLM(qwen_dir, block_size=4, async_scheduling=False) as llm:
        ids = [llm.tokenizer.encode(p) for p in PROMPTS]
        eng, sent_from, original = llm.engine, [], ModelRunner._full_tables

        def check(runner, seqs):
            sent_from.extend((s.blocks_from, len(s.block_ids)) for s in seqs)
            original(runner, seqs)
            for s in seqs:
                assert s.block_ids == eng.requests[s.request_id].block_ids

        monkeypatch.setattr(ModelRunner, "_full_tables", check)
        got = toks(llm.generate(ids, sp))
        monkeypatch.undo()
        deltas = [n for since, n in sent_from if since]
        assert len(deltas) > len(sent_from) // 2 and max(deltas) <= 1  # a block a step at most

        def whole(self, req, n, sent, history):  # every table (and history) sent whole
            return work(self, req, n, None, None)

        work = sched_mod.Scheduler._work
        monkeypatch.setattr(sched_mod.Scheduler, "_work", whole)
        assert toks(llm.generate(ids, sp)) == got


def test_prefix_reads_like_the_list_it_was_then():
    """A streamed output's tokens: a view of the request's growing list, fixed at its length
    when reported (no copy a step)."""
    from moebius.core import Prefix

    items = [5, 6, 7]
    view = Prefix(items)
    items += [8, 9]
    assert len(view) == 3 and list(view) == [5, 6, 7] and view == [5, 6, 7] and view != [5, 6]
    assert view[-1] == 7 and view[1:] == [6, 7] and view[::-1] == [7, 6, 5]
    assert view[:10] == items[:3]
    with pytest.raises(IndexError):
        view[3]
    assert repr(view) == "[5, 6, 7]" and 8 not in view


def test_chat_template(llm):
    out = llm.chat([{"role": "user", "content": "Hello"}], GREEDY)[0]
    rendered = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}])
    assert rendered == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert out.prompt == rendered and len(out.outputs[0].token_ids) == 16


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(top_k=-2),
        dict(min_p=2),
        dict(max_tokens=0),
        dict(n=0),
        dict(logprobs=99),
        dict(stop=[""]),
    ],
)
def test_invalid_sampling_values(kw):
    with pytest.raises(SamplingError):
        SamplingParams(**kw)


def test_prompt_too_long(qwen_dir):
    with LLM(qwen_dir, max_model_len=32) as small:
        with pytest.raises(PromptTooLongError, match="context is 32"):
            small.generate([1] * 40, GREEDY)
        assert small.generate([1] * 8, GREEDY)[0].outputs[0].finish_reason == "length"


def test_max_model_len_beyond_the_kv_cache_is_refused_at_start(qwen_dir):
    """As vLLM: an explicit max_model_len one request could never fill is a start-up error
    that names the capacity; one that fits starts."""
    with pytest.raises(ConfigError, match="larger than the 128 tokens the KV cache holds"):
        LLM(qwen_dir, max_model_len=256, num_kv_blocks=8, block_size=16)
    with LLM(qwen_dir, max_model_len=128, num_kv_blocks=8, block_size=16) as llm:
        assert llm.generate([1] * 8, GREEDY)[0].outputs[0].token_ids


def test_bad_checkpoints(qwen_dir, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        LLM(str(tmp_path / "nope"))
    bad = tmp_path / "bad"
    shutil.copytree(qwen_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match="unsupported architecture 'GPT2LMHeadModel'"):
        LLM(str(bad))
    (bad / "config.json").write_text(json.dumps(cfg))
    with open(bad / "model.safetensors", "r+b") as f:
        f.write(b"garbage!" * 4)
    with pytest.raises(ConfigError, match="corrupt"):
        LLM(str(bad))
    os.remove(bad / "model.safetensors")
    with pytest.raises(ConfigError, match="no model.safetensors"):
        LLM(str(bad))
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_dir(str(bad))


def test_request_longer_than_the_pool_stops_instead_of_livelocking(qwen_dir):
    """A prompt that fits but whose output cannot: finished by length, not preempted forever."""
    with LLM(qwen_dir, num_kv_blocks=4, block_size=4) as tiny:
        out = tiny.generate([1] * 10, SamplingParams(temperature=0, max_tokens=40))[0]
        assert out.outputs[0].finish_reason == "length"
        assert 1 <= len(out.outputs[0].token_ids) <= 16 - 10 + 1
