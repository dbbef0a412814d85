"""Guided decoding through the engine. Greedy, against transformers' own model class
generating with a logits processor that applies a fresh guide's mask to what it generated so
far (so the engine's plumbing, not the grammar, is what is compared: a mask at every sampled
step, from the right outputs, with logit_bias after it), in one batch with a request that has
no guide (its tokens unchanged). Sampled, the same seeded outputs with steps in sequence,
overlapped, and on two ranks through layout switches; every JSON output a prefix of an object
(json.loads reads the finished ones), every choice one of the choices. Bad combinations are
refused. The grammar itself is checked against json.loads in test_json_grammar.py."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from moebius import LLM, SamplingParams
from moebius.core import SamplingError
from moebius.guided import json_grammar as jg
from moebius.guided.guide import Guide, Vocabulary
from moebius.guided.token_bytes import token_bytes
from moebius.tokenizer import Tokenizer
from tests.conftest import PROMPTS, hf_greedy, token_ids

MAX_NEW = 16
CHOICES = ["yes", "no", "maybe so"]


def braces(tok: Tokenizer) -> dict[int, float]:
    return {t: 30.0 for t in tok.encode("{}", add_special_tokens=False)}


class GuideProcessor:
    """transformers LogitsProcessor: only what a new guide allows after the outputs so far."""

    def __init__(self, vocab: Vocabulary, kind: str, prompt_len: int, bias=None) -> None:
        self.vocab, self.kind, self.prompt_len, self.bias = vocab, kind, prompt_len, bias or {}

    def __call__(self, input_ids, scores):
        spec = {"choice": CHOICES, "schema": SCHEMA}.get(self.kind, ())
        guide = Guide(self.vocab, self.kind, spec)
        packed = np.frombuffer(guide.mask(input_ids[0, self.prompt_len:].tolist()), np.uint8)
        keep = np.unpackbits(packed, bitorder="little")[: scores.shape[1]].astype(bool)
        scores = scores.masked_fill(~torch.from_numpy(keep), float("-inf"))
        for t, b in self.bias.items():
            scores[:, t] += b
        return scores


def test_greedy_guided_tokens_match_transformers(qwen_dir):
    from transformers import LogitsProcessorList

    tok = Tokenizer(qwen_dir)
    with LLM(qwen_dir) as llm:
        vocab = llm.engine.vocabulary()
        prompts = [tok.encode(p) for p in (PROMPTS * 2)[:5]]
        specs = [dict(guided_json_object=True), dict(guided_choice=CHOICES),
                 dict(guided_json_object=True, logit_bias=braces(tok)), {},
                 dict(guided_json=SCHEMA, logit_bias=schema_bias(llm))]
        params = [SamplingParams(temperature=0, max_tokens=MAX_NEW, **s) for s in specs]
        got = llm.generate(prompts, params)
        plain = token_ids(llm.generate(prompts[:3], SamplingParams(temperature=0,
                                                                   max_tokens=MAX_NEW)))
    kinds = ["json", "choice", "json", None, "schema"]
    procs = [dict(logits_processor=LogitsProcessorList(
        [GuideProcessor(vocab, k, len(p), s.get("logit_bias"))])) if k else {}
        for k, p, s in zip(kinds, prompts, specs, strict=True)]
    want, _ = hf_greedy(qwen_dir, prompts, MAX_NEW, procs)
    for out, ref in zip(token_ids(got), want, strict=True):
        assert out and out == ref[: len(out)]
    for guided, free in zip(token_ids(got)[:3], plain, strict=True):  # the guides mattered
        assert guided != free[: len(guided)]
    assert got[1].outputs[0].text in CHOICES and got[1].outputs[0].finish_reason == "stop"
    assert json.loads(got[2].outputs[0].text) == {}
    assert got[2].outputs[0].finish_reason == "stop"
    assert len(got[3].outputs[0].token_ids) == MAX_NEW  # no guide: not stopped by one
    assert isinstance(json.loads(got[4].outputs[0].text)["id"], int)


REGEX = r"\d{4}-\d{2}-\d{2}( \d{2}:\d{2})?"
SCHEMA = {"type": "object", "required": ["id"], "properties": {
    "id": {"type": "integer"}, "ok": {"type": "boolean"},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}}}}


def schema_bias(llm: LLM) -> dict[int, float]:
    """Whitespace pushed down, closers up: the tiny random model finishes a document."""
    bias = {i: -100.0 for i, b in enumerate(llm.engine.vocabulary().tokens)
            if b and not b.strip()}
    bias.update({t: 5.0 for t in llm.tokenizer.encode('}]0"', add_special_tokens=False)})
    return bias


def sampled(llm: LLM) -> list[tuple[str, str]]:
    params = ([SamplingParams(seed=s, max_tokens=24, guided_json_object=True) for s in range(6)]
              + [SamplingParams(seed=s, max_tokens=8, guided_choice=CHOICES) for s in range(6)]
              + [SamplingParams(seed=s, max_tokens=32, guided_json=SCHEMA,
                                logit_bias=schema_bias(llm)) for s in range(6)]
              + [SamplingParams(seed=1, max_tokens=24, n=2, guided_json_object=True,
                                logit_bias=braces(llm.tokenizer))]
              + [SamplingParams(seed=s, max_tokens=16, guided_regex=REGEX) for s in range(4)])
    outs = llm.generate(["JSON, please:"] * 18 + ["{"] + ["Date:"] * 4, params)
    return [(c.text, c.finish_reason) for o in outs for c in o.outputs]


@pytest.fixture(scope="module")
def sampled_one_rank(qwen_dir):
    with LLM(qwen_dir) as llm:
        return sampled(llm)


def test_sampled_outputs_keep_to_the_grammar(sampled_one_rank):
    json_outs, choice_outs, schema_outs, bias_outs, regex_outs = (
        sampled_one_rank[:6], sampled_one_rank[6:12], sampled_one_rank[12:18],
        sampled_one_rank[18:20], sampled_one_rank[20:])
    for text, reason in regex_outs:  # whole where it stopped, a prefix where cut
        whole = re.fullmatch(REGEX, text)
        assert whole if reason == "stop" else re.fullmatch(r"[\d: -]*", text), text
    assert [r for _, r in regex_outs].count("stop") >= 2
    for text, reason in json_outs + bias_outs:
        state = jg.advance(jg.OBJECT, text.encode())
        assert state is not None, text
        assert (reason == "stop") == jg.complete(state), (text, reason)
        if reason == "stop":
            assert isinstance(json.loads(text), dict)
    assert all(text in CHOICES and reason == "stop" for text, reason in choice_outs)
    for text, reason in schema_outs:
        doc = json.loads(text)
        assert reason == "stop" and set(doc) <= {"id", "ok", "tags"}
        assert isinstance(doc["id"], int) and isinstance(doc.get("ok", True), bool)
        assert set(doc.get("tags", [])) <= {"a", "b"}
    assert [reason for _, reason in bias_outs] == ["stop", "stop"]  # n=2: a guide each


def test_overlapped_guided_requests_advance_every_step(qwen_dir):
    """Under overlapped steps a guided row is launched with its token in flight and sampled
    once that token lands and its mask is computed (LATE_MASK, ModelRunner.sample_late): a
    request of n tokens takes about n steps beside a plain one, not 2n; the steps of a layout
    switch (all at once) and a second rank change nothing."""
    for kw in (dict(), dict(ranks=2, layout="tp", switch_schedule=[(5, "ep")])):
        with LLM(qwen_dir, async_scheduling=True, **kw) as llm:
            eng = llm.engine
            eng.add_request("JSON, please:", SamplingParams(
                seed=3, max_tokens=20, guided_json_object=True), "g")
            eng.add_request("Hello", SamplingParams(seed=3, max_tokens=20, ignore_eos=True), "p")
            steps, last = 0, {}
            while eng.has_unfinished():
                for out in eng.step():
                    last[out.request_id] = out
                steps += 1
            n = len(last["g"].outputs[0].token_ids)
            assert n >= 8, last["g"].outputs[0].text  # long enough to tell n from 2n steps
            assert steps <= max(n, 20) + 3, (steps, n)


@pytest.mark.parametrize("kw", [
    dict(async_scheduling=True),
    dict(ranks=2, layout="tp", async_scheduling=True, switch_schedule=[(3, "ep"), (9, "tp")]),
    dict(ranks=2, layout="ep", switch_schedule=[(4, "tp")]),
], ids=["overlapped", "tp2-switching", "ep2-switching"])
def test_sampled_outputs_do_not_depend_on_steps_or_layouts(qwen_dir, sampled_one_rank, kw):
    """Overlapped steps sample a guided row after its launch (its mask needs the token in
    flight); the draws are seeded per request, so the outputs stay the same."""
    with LLM(qwen_dir, **kw) as llm:
        assert sampled(llm) == sampled_one_rank


@pytest.mark.parametrize("kw,match", [
    (dict(guided_choice=[]), "guided_choice must be a non-empty list"),
    (dict(guided_choice=["a", ""]), "guided_choice must be a non-empty list"),
    (dict(guided_choice="yes"), "guided_choice must be a non-empty list"),
    (dict(guided_choice=["a"], guided_json_object=True), "exclude each other"),
    (dict(guided_json={"type": "object"}, guided_json_object=True), "exclude each other"),
    (dict(guided_json={"type": "string", "format": "hostname"}), "format 'hostname' cannot"),
    (dict(guided_regex="(a"), "guided_regex: missing"),
    (dict(guided_regex="a", guided_choice=["a"]), "exclude each other"),
    (dict(guided_json="{"), "not valid JSON"),
    (dict(guided_json=[1]), "must be a JSON schema"),
    (dict(guided_json_object=True, ignore_eos=True), "ignore_eos cannot be combined"),
    (dict(guided_choice=["a"], min_tokens=2), "min_tokens cannot be combined"),
])
def test_bad_guided_params_are_sampling_errors(kw, match):
    with pytest.raises(SamplingError, match=match):
        SamplingParams(**kw)


def test_token_bytes_cover_the_checkpoint_vocabulary(qwen_dir):
    tok = Tokenizer(qwen_dir)
    tb = token_bytes(tok.hf, 384)
    text = "{\"a\": [1, 2]}\n"
    assert b"".join(tb[t] for t in tok.encode(text, add_special_tokens=False)) == text.encode()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_guided_on_cuda_matches_cpu(qwen_dir):
    """The packed masks cross to the device (pinned, non-blocking) and mask the same tokens:
    greedy guided outputs in float32 on CUDA (CUDA graphs, overlapped steps) equal the CPU's."""
    params = [SamplingParams(temperature=0, max_tokens=MAX_NEW, guided_json_object=True),
              SamplingParams(temperature=0, max_tokens=MAX_NEW, guided_choice=CHOICES),
              SamplingParams(temperature=0, max_tokens=MAX_NEW, guided_json=SCHEMA)]
    outs = []
    for kw in (dict(), dict(device="cuda", dtype="float32", num_kv_blocks=256)):
        with LLM(qwen_dir, **kw) as llm:
            outs.append(token_ids(llm.generate(PROMPTS[:3], params)))
    assert outs[0] == outs[1]


def test_compact_json_outputs(qwen_dir):
    """guided_compact_json (vLLM's disable_any_whitespace): sampled JSON with whitespace only
    inside strings."""
    params = [SamplingParams(seed=s, max_tokens=24, guided_json_object=True,
                             guided_compact_json=True) for s in range(6)]
    with LLM(qwen_dir) as llm:
        outs = llm.generate(["JSON, please:"] * 6, params)
    for o in outs:
        text, in_string, escaped = o.outputs[0].text, False, False
        assert jg.advance(jg.OBJECT, text.encode()) is not None, text
        for ch in text:
            if in_string:
                in_string = escaped or ch != '"'
                escaped = not escaped and ch == "\\"
            else:
                assert not ch.isspace(), text
                in_string = ch == '"'
