"""The real server (``python -m moebius.server``, 2 CPU ranks, tiny checkpoint, overlapped steps as
on a GPU, a Qwen-style tool template, ``--enable-auto-tool-choice --tool-call-parser hermes``)
driven by the official ``openai`` client: outputs equal the offline API's (with tools and tool-
call history too, and with logit_bias / allowed_token_ids), 64 streams survive two live layout
switches token for token, JSON mode, a JSON schema and guided_choice hold their outputs to the
grammar, tool_choice "required" or a named function forces calls, bad logit rules and requests
for guided decoding it cannot do are 400s, fuzzed bodies never cause a 500, a disconnect aborts
its request, SIGTERM drains and exits 0; /tokenize counts what /v1/completions and
/v1/chat/completions run, /detokenize inverts it, /v1/models/{id} answers the client's
models.retrieve.
Plus in-process checks of the queue bound and of engine failure."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest

from moebius import LLM, SamplingParams
from moebius.guided import json_grammar
from moebius.guided.json_schema import Schema
from moebius.server.tool_choice import forced_schema
from tests.conftest import PROMPTS

MODEL, API_KEY, ADMIN_KEY, MAX_MODEL_LEN = "tiny", "sk-test", "admin-test", 512
AUTH = {"Authorization": f"Bearer {API_KEY}"}
EXTRA = {"ignore_eos": True, "return_tokens_as_token_ids": True}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(qwen_dir, tools_template_path, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "moebius.server",
        qwen_dir,
        "--ranks",
        "2",
        "--layout",
        "tp",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--served-model-name",
        MODEL,
        "--api-key",
        API_KEY,
        "--admin-key",
        ADMIN_KEY,
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--async-scheduling",  # as on a GPU: steps overlap, outputs land a step late
        "on",
        "--chat-template",
        tools_template_path,
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "hermes",
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.3)
    yield SimpleNamespace(proc=proc, base=base, log=log_path)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline(qwen_dir, tools_template_path):
    llm = LLM(qwen_dir, max_model_len=MAX_MODEL_LEN, chat_template=tools_template_path)
    yield llm
    llm.shutdown()


def ids_of(tokens: list[str]) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in tokens]


def metric(server, name: str, labels: str = "") -> float:
    text = httpx.get(f"{server.base}/metrics").text
    m = re.search(rf"^moebius:{name}\{{[^}}]*{labels}[^}}]*\}} (\S+)$", text, re.M)
    return float(m.group(1))


def test_models_health_version_auth(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.base}/health").json() == {"status": "ok"}
    assert "version" in httpx.get(f"{server.base}/version").json()
    bad = openai.OpenAI(base_url=f"{server.base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert httpx.get(f"{server.base}/admin/layout").status_code == 401
    r = httpx.get(f"{server.base}/admin/layout", headers={"X-Admin-Key": ADMIN_KEY})
    assert r.json()["layout"] == "tp" and r.json()["ranks"] == 2


def test_completions_match_offline(client, offline):
    max_tokens = 12
    ref = offline.generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    )
    for prompt, want in zip(PROMPTS, ref, strict=True):
        want = want.outputs[0]
        r = client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            logprobs=0,
            extra_body=EXTRA,
        )
        assert r.choices[0].text == want.text
        assert ids_of(r.choices[0].logprobs.tokens) == want.token_ids
        assert r.usage.completion_tokens == max_tokens and r.choices[0].finish_reason == "length"
        chunks = list(
            client.completions.create(
                model=MODEL,
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=0,
                logprobs=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=EXTRA,
            )
        )
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
        toks = [
            t
            for c in chunks
            if c.choices and c.choices[0].logprobs
            for t in c.choices[0].logprobs.tokens
        ]
        assert ids_of(toks) == want.token_ids
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == max_tokens


def test_echo_scores_the_prompt_as_lm_eval_asks(client, offline):
    """lm-evaluation-harness' loglikelihood request (echo, logprobs=1, max_tokens=1, token ids
    in) and max_tokens 0 (the prompt alone): the prompt's logprobs equal the offline
    prompt_logprobs, the first token's is null; streamed, the prompt comes first."""
    ids = offline.tokenizer.encode(PROMPTS[0])
    ref = offline.generate([ids], SamplingParams(temperature=0, max_tokens=1,
                                                 prompt_logprobs=1))[0]
    want = [None] + [ref.prompt_logprobs[p][t].logprob for p, t in enumerate(ids) if p]
    for max_tokens in (1, 0):
        r = client.completions.create(model=MODEL, prompt=ids, echo=True, logprobs=1,
                                      max_tokens=max_tokens, temperature=0, extra_body=EXTRA)
        c = r.choices[0]
        got = c.logprobs.token_logprobs
        assert ids_of(c.logprobs.tokens)[: len(ids)] == ids and got[0] is None
        assert all(abs(a - b) < 1e-4 for a, b in zip(got[1 : len(ids)], want[1:], strict=True))
        assert c.logprobs.top_logprobs[0] is None and len(c.logprobs.top_logprobs[1]) <= 2
        assert len(got) == len(ids) + max_tokens and c.text.startswith(
            offline.tokenizer.decode(ids))
        assert r.usage.completion_tokens == max_tokens and c.finish_reason == "length"
        chunks = list(client.completions.create(
            model=MODEL, prompt=ids, echo=True, logprobs=1, max_tokens=max_tokens,
            temperature=0, stream=True, extra_body=EXTRA))
        assert "".join(x.choices[0].text for x in chunks) == c.text
        streamed = [v for x in chunks if x.choices[0].logprobs
                    for v in x.choices[0].logprobs.token_logprobs]
        assert streamed == got
    text = client.completions.create(model=MODEL, prompt=PROMPTS[1], echo=True, max_tokens=3,
                                     temperature=0, extra_body=EXTRA)
    assert text.choices[0].text.startswith(PROMPTS[1]) and text.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="max_tokens must be at least 1"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=0)


def test_prompt_logprobs_field(server, offline):
    """vLLM's prompt_logprobs: per completion choice, and at the top of a chat response, with
    ranks and decoded tokens; a 400 when streaming."""
    ids = offline.tokenizer.encode(PROMPTS[2])
    ref = offline.generate([ids], SamplingParams(temperature=0, max_tokens=1,
                                                 prompt_logprobs=2))[0].prompt_logprobs
    body = {"model": MODEL, "prompt": ids, "max_tokens": 2, "prompt_logprobs": 2}
    got = httpx.post(f"{server.base}/v1/completions", json=body, headers=AUTH,
                     timeout=60).json()["choices"][0]["prompt_logprobs"]
    assert got[0] is None and len(got) == len(ids)
    for entry, want in zip(got[1:], ref[1:], strict=True):
        assert [int(t) for t in entry] == list(want)
        for t, v in want.items():
            assert abs(entry[str(t)]["logprob"] - v.logprob) < 1e-4
            assert entry[str(t)]["rank"] == v.rank and entry[str(t)]["decoded_token"]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            "prompt_logprobs": 0}
    r = httpx.post(f"{server.base}/v1/chat/completions", json=chat, headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["prompt_logprobs"][0] is None
    assert all(len(e) == 1 for e in r.json()["prompt_logprobs"][1:])
    for path, b in (("completions", body), ("chat/completions", chat)):
        r = httpx.post(f"{server.base}/v1/{path}", json={**b, "stream": True}, headers=AUTH,
                       timeout=60)
        assert r.status_code == 400 and "prompt_logprobs" in r.json()["error"]["message"]


def test_request_and_prefix_cache_metrics(server, client):
    """vLLM's per-request histograms and prefix-cache counters (tokens): a prompt sent twice is
    served from the cache the second time."""
    before = {k: metric(server, k) for k in (
        "prefix_cache_queries_total", "prefix_cache_hits_total", "request_prompt_tokens_count",
        "request_generation_tokens_sum", "request_decode_time_seconds_count")}
    prompt = PROMPTS[3] * 4
    for _ in range(2):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0,
                                      extra_body=EXTRA)
    n = r.usage.prompt_tokens
    assert metric(server, "prefix_cache_queries_total") - before[
        "prefix_cache_queries_total"] == 2 * n
    assert metric(server, "prefix_cache_hits_total") - before["prefix_cache_hits_total"] >= 16
    assert metric(server, "request_prompt_tokens_count") - before[
        "request_prompt_tokens_count"] == 2
    assert metric(server, "request_generation_tokens_sum") - before[
        "request_generation_tokens_sum"] == 6
    assert metric(server, "request_decode_time_seconds_count") - before[
        "request_decode_time_seconds_count"] == 2
    assert metric(server, "num_preemptions_total") >= 0


def test_continuous_usage_stats(client):
    """vLLM's stream_options.continuous_usage_stats: every chunk carries the usage so far."""
    for chat in (False, True):
        kw = dict(model=MODEL, max_tokens=6, temperature=0, stream=True, extra_body=EXTRA,
                  stream_options={"include_usage": True, "continuous_usage_stats": True})
        chunks = list(client.chat.completions.create(messages=ASK, **kw) if chat
                      else client.completions.create(prompt=PROMPTS[0], **kw))
        used = [c.usage.completion_tokens for c in chunks]
        assert all(c.usage is not None for c in chunks) and used == sorted(used)
        assert used[-1] == 6 and len({c.usage.prompt_tokens for c in chunks}) == 1
        assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
                   for c in chunks)
    plain = list(client.completions.create(model=MODEL, prompt="hi", max_tokens=2, stream=True,
                                           stream_options={"include_usage": True}))
    assert [c.usage is None for c in plain] == [True] * (len(plain) - 1) + [False]


def test_return_token_ids(server, offline):
    """vLLM's return_token_ids: the prompt's and the output's ids beside the text; streamed,
    the prompt's in each choice's first chunk and the new ids in every chunk, which merge to
    the whole (forced tool calls and plain chat alike)."""
    ids = offline.tokenizer.encode(PROMPTS[1])
    want = offline.generate([ids], SamplingParams(temperature=0, max_tokens=8,
                                                  ignore_eos=True))[0].outputs[0].token_ids
    url = f"{server.base}/v1/completions"
    body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    c = httpx.post(url, json=body, headers=AUTH, timeout=60).json()["choices"][0]
    assert (c["prompt_token_ids"], c["token_ids"]) == (ids, want)
    events = sse_bodies(httpx.post(url, json={**body, "stream": True}, headers=AUTH,
                                   timeout=60))
    assert events[0]["choices"][0]["prompt_token_ids"] == ids
    assert [t for e in events for t in e["choices"][0]["token_ids"]] == want
    chat_url = f"{server.base}/v1/chat/completions"
    for extra in ({}, {"tools": FORCED_TOOLS, "tool_choice": "required"}):
        chat = {"model": MODEL, "messages": ASK, "max_tokens": 8, "temperature": 0,
                "return_token_ids": True, **extra}
        whole = httpx.post(chat_url, json=chat, headers=AUTH, timeout=60).json()
        assert whole["prompt_token_ids"] and len(whole["choices"][0]["token_ids"]) == \
            whole["usage"]["completion_tokens"]
        events = sse_bodies(httpx.post(chat_url, json={**chat, "stream": True}, headers=AUTH,
                                       timeout=60))
        assert events[0]["prompt_token_ids"] == whole["prompt_token_ids"]
        assert [t for e in events for t in e["choices"][0]["token_ids"]] == whole[
            "choices"][0]["token_ids"]


def sse_bodies(resp) -> list[dict]:
    """A stream's JSON events, without the final [DONE]."""
    lines = [ln[6:] for ln in resp.text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_chat_matches_offline(client, offline):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    want = offline.chat(messages, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[
        0
    ].outputs[0]
    r = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == 10
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_completion_tokens=10,
        temperature=0,
        stream=True,
        logprobs=True,
        top_logprobs=2,
        stream_options={"include_usage": True},
        extra_body=EXTRA,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    lps = [
        x
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for x in c.choices[0].logprobs.content
    ]
    assert ids_of([x.token for x in lps]) == want.token_ids
    assert all(len(x.top_logprobs) == 2 for x in lps)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.prompt_tokens > 0 and chunks[-1].usage.completion_tokens == 10


def test_chat_template_kwargs(client, offline):
    """vLLM's chat_template_kwargs reach the template (the tiny one, like Qwen3's, opens an
    empty think block with enable_thinking=False); names the server sets are refused (400)."""
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = offline.chat(messages, sp, chat_template_kwargs={"enable_thinking": False})[0]
    assert want.prompt.endswith("<think>\n\n</think>\n\n")
    plain, off = (
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=6, temperature=0,
            extra_body={"ignore_eos": True, **extra},
        )
        for extra in ({}, {"chat_template_kwargs": {"enable_thinking": False}})
    )
    assert off.usage.prompt_tokens == len(want.prompt_token_ids) > plain.usage.prompt_tokens
    assert off.choices[0].message.content == want.outputs[0].text
    for bad in ({"messages": []}, {"add_generation_prompt": False}, ["not", "a", "dict"]):
        with pytest.raises(openai.BadRequestError, match="chat_template_kwargs"):
            client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=2,
                extra_body={"chat_template_kwargs": bad},
            )


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {}}}}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def test_tools_reach_the_prompt(client, offline):
    """With tools the server builds the prompt LLM.chat(tools=...) builds: same prompt length,
    same greedy text (random text holds no call, so it stays content), streamed or not; a
    tool-call history (arguments as JSON text) renders as the offline one (as objects)."""
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    plain, want = offline.chat(ASK, sp)[0], offline.chat(ASK, sp, tools=TOOLS)[0]
    assert "<tools>" in want.prompt and len(want.prompt_token_ids) > len(plain.prompt_token_ids)
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=8, temperature=0,
              extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**kw)
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.choices[0].message.content == want.outputs[0].text
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.outputs[0].text
    none = client.chat.completions.create(**{**kw, "tool_choice": "none"})
    assert none.usage.prompt_tokens == len(plain.prompt_token_ids)

    args = {"city": "Paris"}
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": json.dumps(args)}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    local = [*ASK, {**history[1], "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": args}}]}, history[2]]
    want = offline.chat(local, sp, tools=TOOLS)[0]
    assert '"arguments": {"city": "Paris"}' in want.prompt and 'id="call_1"' in want.prompt
    r = client.chat.completions.create(**{**kw, "messages": history})
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.choices[0].message.content == want.outputs[0].text


FORCED_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "clock", "parameters": {
        "type": "object", "properties": {}}}}]


@pytest.mark.parametrize("choice", ["required", "get_weather"])
def test_tool_choice_required_or_named_forces_calls(client, offline, choice):
    """The real engine under the forced schema (moebius/server/tool_choice.py): the tiny
    random model writes calls of the request's tools with their arguments' structure (the
    hermes parser of this server plays no part); cut off by max_tokens, what came is a prefix
    of such calls. Whitespace is pushed down and closers up, so most seeds finish."""
    tokens = offline.engine.vocabulary().tokens
    bias = {str(i): -100 for i, b in enumerate(tokens) if b and not b.strip()}
    bias.update({str(t): 5 for t in offline.tokenizer.encode("}]", add_special_tokens=False)})
    bias.update({str(t): 12 for t in offline.tokenizer.encode('"', add_special_tokens=False)})
    tool_choice = choice if choice == "required" else {"type": "function",
                                                       "function": {"name": choice}}
    schema = Schema(forced_schema(FORCED_TOOLS, None if choice == "required" else choice, True))
    stopped = 0
    for seed in range(6):
        r = client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=48, seed=seed, tools=FORCED_TOOLS,
            tool_choice=tool_choice, extra_body={"logit_bias": bias}).choices[0]
        if r.finish_reason == "length":  # cut: a prefix of the forced text
            text = r.message.content
            if text is None and choice != "required":  # a named call's arguments so far
                text = r.message.tool_calls[0].function.arguments
            if text is not None:
                assert json_grammar.advance(schema.start, text.encode(), schema.step), text
            continue
        assert r.finish_reason == "stop" and r.message.content is None
        for call in r.message.tool_calls:
            args = json.loads(call.function.arguments)
            assert call.function.name in ("get_weather", "clock") and isinstance(args, dict)
            if call.function.name == "get_weather":
                assert isinstance(args["city"], str)
        if choice != "required":
            assert [c.function.name for c in r.message.tool_calls] == [choice]
        stopped += 1
    assert stopped >= 3


def test_bad_tool_fields_are_400(client):
    named = {"type": "function", "function": {"name": "nope"}}
    bad_history = [*ASK, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{x"}}]}]
    for kw, match in [({"tools": TOOLS, "tool_choice": named}, "'nope' is not in tools"),
                      ({"tool_choice": "auto"}, "needs tools"),
                      ({"messages": bad_history}, "arguments is not valid JSON")]:
        with pytest.raises(openai.BadRequestError, match=match):
            client.chat.completions.create(**{"model": MODEL, "messages": ASK, "max_tokens": 2,
                                              **kw})


def test_penalties_match_offline(client, offline):
    kw = dict(presence_penalty=0.6, frequency_penalty=1.5)
    want = offline.generate(["Hello"], SamplingParams(temperature=0, max_tokens=12,
                                                      ignore_eos=True, **kw))[0].outputs[0]
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True}, **kw)
    assert r.choices[0].text == want.text


def test_logit_bias_and_allowed_token_ids(client, offline):
    """OpenAI's logit_bias (token ids as string keys) on both endpoints and vLLM's
    allowed_token_ids: the offline API's tokens; top logprobs of masked tokens are -9999.0
    (vLLM's and OpenAI's stand-in for -inf, which JSON cannot carry), streamed or not."""
    allowed = [5, 9, 200, 301]
    want = offline.generate(["Hello"], SamplingParams(
        temperature=1.0, seed=11, max_tokens=8, ignore_eos=True, logit_bias={9: 2.0, 200: -1.5},
        allowed_token_ids=allowed))[0].outputs[0]
    r = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=8, temperature=1.0, seed=11, logprobs=0,
        logit_bias={"9": 2.0, "200": -1.5}, extra_body={**EXTRA, "allowed_token_ids": allowed})
    assert ids_of(r.choices[0].logprobs.tokens) == want.token_ids
    assert set(want.token_ids) <= set(allowed) and len(set(want.token_ids)) >= 2
    kw = dict(model=MODEL, messages=ASK, max_tokens=5, temperature=0, logprobs=True,
              top_logprobs=3, logit_bias={"7": 100},
              extra_body={**EXTRA, "allowed_token_ids": [7, 9]})
    full = client.chat.completions.create(**kw).choices[0].logprobs.content
    chunks = client.chat.completions.create(stream=True, **kw)
    streamed = [x for c in chunks if c.choices and c.choices[0].logprobs
                for x in c.choices[0].logprobs.content]
    for lps in (full, streamed):
        assert ids_of([x.token for x in lps]) == [7] * 5
        for x in lps:
            assert ids_of([t.token for t in x.top_logprobs[:2]]) == [7, 9]
            assert x.top_logprobs[2].logprob == -9999.0


@pytest.mark.parametrize("extra,match", [
    ({"logit_bias": {"abc": 1}}, "logit_bias: keys must be token ids"),
    ({"logit_bias": {"-1": 1}}, "logit_bias: keys must be token ids"),
    ({"logit_bias": {"\u0663": 1}}, "logit_bias: keys must be token ids"),  # an Arabic 3
    ({"logit_bias": {"5": 1, "05": 2}}, "token id 5 is given twice"),
    ({"logit_bias": {"5": 100.5}}, "logit_bias.5: Input should be less than or equal to 100"),
    ({"logit_bias": {"5": -101}}, "logit_bias.5"),
    ({"logit_bias": {"5": "1"}}, "logit_bias.5"),
    ({"logit_bias": {"999999": 1}}, r"logit_bias must be token ids in \[0, 384\)"),
    ({"logit_bias": {str(t): 1 for t in range(1025)}}, "logit_bias"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [-1]}, "allowed_token_ids"),
    ({"allowed_token_ids": [3, 384]}, r"allowed_token_ids must be token ids in \[0, 384\)"),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "strict": True,
                                          "schema": {"type": "integer", "minimum": 3}}}},
     "guided_json: #: minimum cannot be enforced"),
    ({"response_format": {"type": "json_schema"}}, "needs its json_schema.schema"),
    ({"response_format": {"type": "structural_tag"}},
     "guided decoding is not supported: response_format 'structural_tag'"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"guided_json": {"$ref": "#/nowhere"}}, "does not resolve"),
    ({"guided_json": "{not json"}, "guided_json is not valid JSON"),
    ({"guided_json": {"type": "object"}, "guided_choice": ["a"]}, "exclude each other"),
    ({"guided_regex": "(?=a)"}, "guided_regex: group syntax"),
    ({"guided_grammar": "root ::= x"}, "guided decoding is not supported: guided_grammar"),
    ({"guided_choice": []}, "guided_choice must be a non-empty list"),
    ({"guided_choice": ["yes", ""]}, "guided_choice must be a non-empty list"),
    ({"guided_choice": "yes"}, "guided_choice"),
    ({"guided_choice": ["yes"], "ignore_eos": True}, "ignore_eos cannot be combined"),
    ({"guided_choice": ["yes"], "response_format": {"type": "json_object"}}, "exclude each other"),
    ({"guided_grammar": "root ::= 'a'"}, "guided decoding is not supported: guided_grammar"),
    ({"priority": 3}, "needs the priority scheduling policy"),  # an fcfs server
    ({"priority": "3"}, "priority"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
])
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_bad_logit_rules_and_guided_decoding_are_400(client, endpoint, extra, match):
    with pytest.raises(openai.BadRequestError, match=match):
        if endpoint == "chat":
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2,
                                           extra_body=extra)
        else:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body=extra)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_json_mode_schema_and_guided_choice(client, offline, endpoint):
    """response_format json_object: the text is a JSON object where it stopped, a prefix of
    one where max_tokens cut it, and (seeded) the offline API's one-rank, non-overlapped
    text; guided_choice: exactly one of the choices; guided_regex: a whole match."""
    def ask(extra, max_tokens, seed):
        if endpoint == "chat":
            r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=max_tokens,
                                               seed=seed, extra_body=extra)
            return r.choices[0].message.content, r.choices[0].finish_reason
        r = client.completions.create(model=MODEL, prompt="JSON:", max_tokens=max_tokens,
                                      seed=seed, extra_body=extra)
        return r.choices[0].text, r.choices[0].finish_reason

    # "{" and "}" pushed up: the model opens and closes an object, then must stop
    braces = {"logit_bias": {str(t): 30 for t in offline.tokenizer.encode("{}")}}
    text, reason = ask({"response_format": {"type": "json_object"}, **braces}, 40, 1)
    assert reason == "stop" and json.loads(text) == {}
    for seed in range(4):
        text, reason = ask({"response_format": {"type": "json_object"}}, 24, seed)
        state = json_grammar.advance(json_grammar.OBJECT, text.encode())
        assert state is not None, text
        if reason == "stop":
            assert isinstance(json.loads(text), dict)
        if endpoint == "completions":  # one rank, steps in sequence: the same draw
            sp = SamplingParams(seed=seed, max_tokens=24, guided_json_object=True)
            assert offline.generate(["JSON:"], sp)[0].outputs[0].text == text
    choices = ["yes", "no", "maybe so"]
    for seed in range(4):
        text, reason = ask({"guided_choice": choices}, 20, seed)
        assert text in choices and reason == "stop"
        text, reason = ask({"guided_regex": r"(yes|no)![0-9]?"}, 20, seed)
        assert re.fullmatch(r"(yes|no)![0-9]?", text) and reason == "stop", text
    # a JSON schema (pydantic's shape: $defs, a $ref, an Optional); whitespace pushed down and
    # closers up, so that the tiny random model finishes within max_tokens
    schema = {"$defs": {"Item": {"type": "object", "properties": {
        "id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["id"]}},
        "type": "object", "properties": {
            "item": {"$ref": "#/$defs/Item"},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
        "required": ["item"]}
    tokens = offline.engine.vocabulary().tokens
    bias = {str(i): -100 for i, b in enumerate(tokens) if b and not b.strip()}
    bias.update({str(t): 5 for t in offline.tokenizer.encode('}]0"', add_special_tokens=False)})
    push = {"logit_bias": bias}
    fmt = {"type": "json_schema", "json_schema": {"name": "order", "schema": schema}}
    stopped = 0
    for seed in range(6):
        text, reason = ask({"response_format": fmt, **push}, 48, seed)
        if reason == "stop":
            doc = json.loads(text)
            assert set(doc) <= {"item", "note"} and isinstance(doc["item"]["id"], int)
            assert all(isinstance(t, str) for t in doc["item"].get("tags", []))
            assert doc.get("note") is None or isinstance(doc["note"], str)
            stopped += 1
    assert stopped >= 3


def test_text_response_format_is_accepted(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3, temperature=0,
                                       response_format={"type": "text"},
                                       extra_body={"ignore_eos": True, "guided_json": None})
    assert r.usage.completion_tokens == 3


def test_several_prompts_and_n(client):
    r = client.completions.create(
        model=MODEL, prompt=["Hello", "def add(a, b):"], n=2, max_tokens=4, temperature=0.8, seed=7
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 16
    again = client.completions.create(
        model=MODEL, prompt=["Hello", "def add(a, b):"], n=2, max_tokens=4, temperature=0.8, seed=7
    )
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeded


BAD_BODIES = [
    (b'{"model": "tiny", "prompt": "hi"', 400),  # malformed JSON
    (b"\xff\xfe not utf-8", 400),
    (b'["a list"]', 400),
    (b'{"prompt": "hi"}', 400),  # missing model
    (b'{"model": "tiny"}', 400),  # missing prompt
    (b'{"model": "tiny", "prompt": "hi", "max_tokens": "4"}', 400),  # wrong type
    (b'{"model": "tiny", "prompt": "hi", "temperature": -1}', 400),  # out of range
    (b'{"model": "tiny", "prompt": "hi", "top_p": 0}', 400),
    (b'{"model": "tiny", "prompt": "hi", "max_tokens": 0}', 400),
    (b'{"model": "tiny", "prompt": "hi", "logprobs": 21}', 400),
    (b'{"model": "tiny", "prompt": "hi", "stop_token_ids": [999999]}', 400),
    (b'{"model": "tiny", "prompt": "hi", "max_tokens": 1000}', 400),  # over the context
    (json.dumps({"model": "tiny", "prompt": [5] * (MAX_MODEL_LEN + 44)}).encode(), 400),  # long
    (b'{"model": "tiny", "prompt": ""}', 400),  # empty prompt
    (b'{"model": "gpt-4", "prompt": "hi"}', 404),  # unknown model
]


@pytest.mark.parametrize("body,status", BAD_BODIES)
def test_bad_input_is_openai_error(server, body, status):
    r = httpx.post(f"{server.base}/v1/completions", content=body, headers=AUTH, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]


def test_openai_client_sees_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=3
        )
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")


def test_models_retrieve(server, client):
    """OpenAI's GET /v1/models/{id}: the list's card, or a 404 the client raises as OpenAI's."""
    card = client.models.retrieve(MODEL)
    listed = client.models.list().data[0]
    assert card.id == MODEL and card.object == "model" and card.max_model_len == MAX_MODEL_LEN
    assert card.model_dump(exclude={"created"}) == listed.model_dump(exclude={"created"})
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    r = httpx.get(f"{server.base}/v1/models/gpt-4", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.get(f"{server.base}/v1/models/{MODEL}").status_code == 401


def tokenize(server, body: dict) -> dict:
    r = httpx.post(f"{server.base}/tokenize", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def detokenize(server, tokens: list[int]) -> str:
    r = httpx.post(f"{server.base}/detokenize", json={"tokens": tokens}, headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()["prompt"]


def test_tokenize_a_prompt_as_completions_does(server, client, offline):
    """/tokenize's ids are the ones /v1/completions runs: the same count as its usage, and
    the same greedy text when sent back as token ids; /detokenize inverts it."""
    for prompt in PROMPTS:
        r = tokenize(server, {"model": MODEL, "prompt": prompt})
        assert r["max_model_len"] == MAX_MODEL_LEN and r["token_strs"] is None
        assert r["count"] == len(r["tokens"]) and r["tokens"] == offline.tokenizer.encode(prompt)
        kw = dict(model=MODEL, max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
        text = client.completions.create(prompt=prompt, **kw)
        ids = client.completions.create(prompt=r["tokens"], **kw)
        assert r["count"] == text.usage.prompt_tokens == ids.usage.prompt_tokens
        assert text.choices[0].text == ids.choices[0].text
        assert detokenize(server, r["tokens"]) == prompt
    assert detokenize(server, []) == ""


def test_tokenize_returns_token_strs(server, offline):
    prompt = "The quick brown fox jumps over the lazy dog."
    r = tokenize(server, {"prompt": prompt, "return_token_strs": True})  # model left out
    assert len(r["token_strs"]) == r["count"] > 1
    # byte-level BPE: the vocabulary writes a space as "Ġ"
    assert "".join(r["token_strs"]).replace("Ġ", " ") == prompt
    assert r["token_strs"] == [offline.tokenizer.convert_ids_to_tokens([t])[0]
                               for t in r["tokens"]]


CHATS = [
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "Capital of "},
                                               {"type": "text", "text": "France?"}]}]},
    {"messages": ASK, "chat_template_kwargs": {"enable_thinking": False}},
    {"messages": ASK, "tools": TOOLS},
    {"messages": ASK, "tools": TOOLS, "tool_choice": "none"},
    {"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}], "tools": TOOLS},
    {"messages": [*ASK, {"role": "assistant", "content": "It is"}],
     "add_generation_prompt": False, "continue_final_message": True},
    {"messages": ASK, "add_generation_prompt": False},
]


@pytest.mark.parametrize("body", CHATS)
def test_tokenize_a_chat_as_chat_completions_does(server, client, body):
    """Messages, tools, tool_choice "none", template kwargs and continue_final_message render
    the prompt /v1/chat/completions runs: the count equals its usage.prompt_tokens."""
    r = tokenize(server, {"model": MODEL, **body})
    done = client.chat.completions.create(
        model=MODEL, max_tokens=1, messages=body["messages"],
        extra_body={k: v for k, v in body.items() if k != "messages"})
    assert r["count"] == done.usage.prompt_tokens == len(r["tokens"])
    text = detokenize(server, r["tokens"])  # special tokens are kept
    assert text.startswith("<|im_start|>") and tokenize(server, {"prompt": text}) == {
        **r, "token_strs": None}
    if body.get("continue_final_message"):
        assert text.endswith("<|im_start|>assistant\nIt is")
    elif body.get("add_generation_prompt", True):
        assert text.endswith("<|im_start|>assistant\n") or text.endswith("</think>\n\n")
    else:
        assert text.endswith("<|im_end|>\n")


def test_tokenize_chat_forms_differ(server):
    """The variants above are not all the same prompt (else the checks prove nothing)."""
    counts = [tokenize(server, body)["count"] for body in CHATS]
    assert len(set(counts)) >= 5, counts


BOTH = {"continue_final_message": True, "add_generation_prompt": True}
BAD_TOKENIZE = [
    ("/tokenize", b'{"model": "tiny", "prompt": "hi"', 400),  # malformed JSON
    ("/tokenize", b'["hi"]', 400),
    ("/tokenize", {"model": MODEL}, 400),  # neither prompt nor messages
    ("/tokenize", {"prompt": 5}, 400),
    ("/tokenize", {"prompt": ["hi"]}, 400),
    ("/tokenize", {"prompt": "hi", "add_special_tokens": "yes"}, 400),
    ("/tokenize", {"prompt": "hi", "return_token_strs": 1}, 400),
    ("/tokenize", {"messages": []}, 400),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("/tokenize", {"messages": ASK, "continue_final_message": True}, 400),  # the default gen
    ("/tokenize", {"messages": ASK, **BOTH}, 400),
    ("/tokenize", {"messages": ASK, "chat_template_kwargs": {"messages": []}}, 400),
    ("/tokenize", {"messages": ASK, "tools": [{"type": "function"}]}, 400),
    ("/tokenize", {"model": "gpt-4", "prompt": "hi"}, 404),
    ("/tokenize", {"model": "gpt-4", "messages": ASK}, 404),
    ("/detokenize", {"tokens": [-1]}, 400),
    ("/detokenize", {"tokens": [10**6]}, 400),
    ("/detokenize", {"tokens": [2**70]}, 400),
    ("/detokenize", {"tokens": [1.0]}, 400),
    ("/detokenize", {"tokens": [True]}, 400),
    ("/detokenize", {"tokens": "abc"}, 400),
    ("/detokenize", {}, 400),
    ("/detokenize", b"\xff", 400),
    ("/detokenize", {"model": "gpt-4", "tokens": [1]}, 404),
    ("/v1/chat/completions", {"model": MODEL, "messages": ASK, "max_tokens": 1, **BOTH}, 400),
]


@pytest.mark.parametrize("path,body,status", BAD_TOKENIZE)
def test_bad_tokenize_bodies(server, path, body, status):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.base}{path}", content=raw, headers=AUTH, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    if status == 404:
        assert err["code"] == "model_not_found" and err["param"] == "model"
    if isinstance(body, dict) and body.get("continue_final_message"):
        assert "continue_final_message" in err["message"]


def test_detokenize_stops_at_the_tokenizer_vocabulary(server, offline):
    """An id past the tokenizer's vocabulary is a 400 naming the bound; its last id is fine;
    keys are checked."""
    vocab = offline.tokenizer.vocab_size
    detokenize(server, [vocab - 1])
    r = httpx.post(f"{server.base}/detokenize", json={"tokens": [0, vocab]}, headers=AUTH)
    assert r.status_code == 400 and str(vocab) in r.json()["error"]["message"]
    assert httpx.post(f"{server.base}/tokenize", json={"prompt": "x"}).status_code == 401
    assert httpx.post(f"{server.base}/detokenize", json={"tokens": [1]}).status_code == 401


def test_tokenize_fuzz_never_500(server):
    """Random bodies of both forms: a 200, 400 or 404, never a 500."""
    rng = random.Random(99)
    values = [None, -1, 0, 1, 2**64, 1.5, True, "", "hi", [], {}, [1, 2], [-1], ["a"],
              ASK, [{"role": "user"}], TOOLS, {"enable_thinking": False}, {"messages": 1}]
    keys = ["model", "prompt", "messages", "tokens", "add_special_tokens", "return_token_strs",
            "add_generation_prompt", "continue_final_message", "tools", "tool_choice",
            "chat_template_kwargs"]
    statuses = []
    with httpx.Client(base_url=server.base, headers=AUTH, timeout=60) as c:
        for _ in range(150):
            path = rng.choice(["/tokenize", "/detokenize"])
            body = rng.choice([{"prompt": "Hello"}, {"messages": ASK}, {"tokens": [5, 6]}])
            for _ in range(rng.randint(1, 3)):
                body[rng.choice(keys)] = rng.choice(values)
            r = c.post(path, json=body)
            assert r.status_code in (200, 400, 404), (path, body, r.text)
            statuses.append(r.status_code)
    assert statuses.count(200) > 10 and statuses.count(400) > 10


def test_64_streams_survive_two_switches(server, client, offline):
    num, max_tokens = 64, 24
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(num)]
    ref = offline.generate(
        prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    )
    got: list[list[int] | None] = [None] * num
    started = threading.Semaphore(0)
    errors = []

    def run(i: int) -> None:
        try:
            stream = client.completions.create(
                model=MODEL,
                prompt=prompts[i],
                stream=True,
                max_tokens=max_tokens,
                temperature=0,
                logprobs=0,
                extra_body=EXTRA,
            )
            toks = []
            for chunk in stream:
                if not toks:
                    started.release()
                toks += chunk.choices[0].logprobs.tokens
            got[i] = ids_of(toks)
        except Exception as e:  # reported below
            errors.append(e)
            started.release()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(num)]
    for t in threads:
        t.start()
    for _ in range(num):
        assert started.acquire(timeout=120)
    admin = {"X-Admin-Key": ADMIN_KEY}
    records = []
    for layout in ("ep", "tp"):
        r = httpx.post(
            f"{server.base}/admin/switch", json={"layout": layout}, headers=admin, timeout=120
        )
        assert r.status_code == 200 and r.json()["layout"] == layout, r.text
        records.append(r.json()["switch"])
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert all(rec["running"] > 0 for rec in records), records  # switched mid-stream
    for i in range(num):
        assert got[i] == ref[i].outputs[0].token_ids, f"stream {i} differs"
    assert metric(server, "switches_total") >= 2
    assert metric(server, "layout", 'layout="tp"') == 1
    assert metric(server, "switch_bytes_total", 'kind="weights"') > 0


def test_weight_update_waits_for_running_streams(server, client, offline, qwen_dir, qwen_b_dir):
    """/admin/update_weights mid-stream: the stream finishes under the weights it began with,
    requests after the update get the new checkpoint's tokens; another model's checkpoint is a
    400 and the server serves on. The module's other tests need A: it is restored."""
    admin = {"X-Admin-Key": ADMIN_KEY}
    greedy = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    want_a = offline.generate([PROMPTS[1]], greedy)[0].outputs[0]
    with LLM(qwen_b_dir, max_model_len=MAX_MODEL_LEN) as b:
        want_b = b.generate([PROMPTS[1]], greedy)[0].outputs[0].token_ids
    assert want_a.token_ids != want_b
    got, first = [], threading.Event()

    def stream():
        for chunk in client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=200,
                                               temperature=0, stream=True, extra_body=EXTRA):
            got.append(chunk.choices[0].text)
            first.set()

    t = threading.Thread(target=stream)
    t.start()
    assert first.wait(60)
    try:
        assert t.is_alive()  # the update is asked mid-stream
        r = httpx.post(f"{server.base}/admin/update_weights", json={"model_path": qwen_b_dir},
                       headers=admin, timeout=120)
        assert r.status_code == 200 and r.json()["success"], r.text
        version = r.json()["weights_version"]
        t.join(60)
        assert "".join(got) == want_a.text
        after = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=200,
                                          temperature=0, logprobs=0, extra_body=EXTRA)
        assert ids_of(after.choices[0].logprobs.tokens) == want_b
        bad = httpx.post(f"{server.base}/admin/update_weights",
                         json={"model_path": "/no/such/dir"}, headers=admin, timeout=60)
        assert bad.status_code == 400 and "cannot read" in bad.json()["error"]["message"]
        assert httpx.post(f"{server.base}/admin/update_weights", json={"model_path": qwen_dir},
                          timeout=60).status_code == 401
    finally:
        back = httpx.post(f"{server.base}/admin/update_weights", json={"model_path": qwen_dir},
                          headers=admin, timeout=120)
    assert back.status_code == 200 and back.json()["weights_version"] == version + 1
    layout = httpx.get(f"{server.base}/admin/layout", headers=admin).json()
    assert layout["stats"]["weights_version"] == version + 1


def fuzz_cases(seed: int, count: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    values = [
        None,
        -1,
        0,
        1,
        2,
        2.5,
        -0.5,
        1e308,
        -1e308,
        10**30,
        -(2**63),
        2**64,
        True,
        False,
        "",
        "x",
        "a" * 3000,
        [],
        {},
        [1, "a"],
        [[1, 2]],
        {"a": {"b": []}},
        [-1],
        [10**9],
        ["stop"],
        {"include_usage": True},
        {"include_usage": "yes"},
        [{"role": "user"}],
        [{"role": "wizard", "content": "x"}],
        [{"content": 3}],
        "auto",
        "required",
        [{"type": "function", "function": {"name": "f"}}],
        {"type": "function", "function": {"name": "f"}},
        [{"role": "assistant", "tool_calls": [{"type": "function",
                                               "function": {"name": "f", "arguments": "{"}}]}],
        [{"role": "tool", "tool_call_id": "c", "content": "x"}],
        {"5": 1},
        {"5": 1e9, "x": 1},
        [5, 383],
        {"type": "text"},
        {"type": "json_object"},
    ]
    keys = [
        "model",
        "prompt",
        "messages",
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "stream",
        "stop",
        "seed",
        "logprobs",
        "top_k",
        "min_p",
        "stream_options",
        "stop_token_ids",
        "min_tokens",
        "top_logprobs",
        "max_completion_tokens",
        "presence_penalty",
        "echo",
        "prompt_logprobs",
        "priority",
        "ignore_eos",
        "best_of",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "logit_bias",
        "allowed_token_ids",
        "response_format",
        "guided_choice",
        "unknown_field",
    ]
    cases = []
    for _ in range(count):
        path = rng.choice(["/v1/completions", "/v1/chat/completions"])
        if path == "/v1/completions":
            body = {"model": MODEL, "prompt": "Hello there", "max_tokens": 2}
        else:
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 2,
            }
        body["stream"] = rng.random() < 0.3
        for _ in range(rng.randint(1, 3)):
            key = rng.choice(keys)
            value = rng.choice(values)
            if key in ("max_tokens", "max_completion_tokens") and value is None:
                continue  # no limit: valid, but runs to the context; keep the test fast
            if rng.random() < 0.2:
                body.pop(key, None)
            else:
                body[key] = value
        raw = json.dumps(body).encode()
        kind = rng.random()
        if kind < 0.1:
            raw = raw[: rng.randint(0, len(raw))]  # truncated
        elif kind < 0.15:
            raw = bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
        elif kind < 0.2:
            raw = json.dumps(rng.choice(values)).encode()  # not an object
        elif kind < 0.22:
            raw = b"[" * 5000 + b"]" * 5000
        elif kind < 0.25:
            raw = raw.replace(b'"max_tokens": 2', b'"max_tokens": NaN')
        cases.append((path, raw))
    return cases


def test_fuzz_never_500(server):
    cases = fuzz_cases(seed=1234, count=400)

    async def go():
        sem = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=server.base, headers=AUTH, timeout=120) as c:

            async def one(path, raw):
                async with sem:
                    r = await c.post(path, content=raw)
                    return r.status_code, r.text

            return await asyncio.gather(*(one(p, raw) for p, raw in cases))

    results = asyncio.run(go())
    statuses = [s for s, _ in results]
    assert all(s < 500 for s in statuses), [r for r in results if r[0] >= 500][:3]
    assert set(statuses) <= {200, 400, 404}, set(statuses)
    assert statuses.count(400) > 100 and statuses.count(200) > 20
    for s, text in results:
        if s != 200:
            assert json.loads(text)["error"]["message"]
    assert httpx.get(f"{server.base}/health").status_code == 200


def test_disconnect_aborts_request(server):
    aborted_before = metric(server, "request_success_total", 'finished_reason="abort"')
    body = {
        "model": MODEL,
        "prompt": "Hello",
        "max_tokens": 200,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream(
        "POST", f"{server.base}/v1/completions", json=body, headers=AUTH, timeout=60
    ) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert metric(server, "num_requests_running") == 1
    deadline = time.monotonic() + 10
    while metric(server, "num_requests_running") != 0:
        assert time.monotonic() < deadline, "the disconnected request kept running"
        time.sleep(0.1)
    assert metric(server, "request_success_total", 'finished_reason="abort"') > aborted_before
    assert metric(server, "kv_cache_usage_perc") == 0


def test_sigterm_drains_then_exits_0(server):
    """Last: it stops the module's server. The stream is long enough (200 steps) to be in
    flight while new requests are refused."""
    max_tokens = 200
    body = {
        "model": MODEL,
        "prompt": "Hello",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream(
        "POST", f"{server.base}/v1/completions", json=body, headers=AUTH, timeout=60
    ) as r:
        lines = (x for x in r.iter_lines() if x)
        next(lines)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        try:  # refused either way: 503 while draining, or no longer listening
            late = httpx.post(
                f"{server.base}/v1/completions",
                headers=AUTH,
                timeout=30,
                json={"model": MODEL, "prompt": "x", "max_tokens": 2},
            )
            health = httpx.get(f"{server.base}/health")
            assert late.status_code == 503 and late.headers["retry-after"], late.text
            assert health.status_code == 503
        except httpx.ConnectError:
            pass
        rest = list(lines)
    assert rest[-1] == "data: [DONE]" and len(rest) == max_tokens  # the other tokens, [DONE]
    assert server.proc.wait(60) == 0


# ---------------------------------------------------------------- in process, a fake engine
class FakeEngine:
    """Just enough of ``LLMEngine`` for the async front: a step blocks until released and
    then fails like a dead worker."""

    def __init__(self) -> None:
        from moebius.engine.worker import WorkerError

        self.error_cls = WorkerError
        self.switches, self.layout, self.waiting = [], "tp", set()
        self.weight_updates = []
        self.release = threading.Event()
        self.cfg = SimpleNamespace(
            context_len=64, model=SimpleNamespace(vocab_size=100), model_dir=None, ranks=1
        )
        self.tokenizer = SimpleNamespace(encode=lambda s, add_special_tokens=True: [1, 2, 3])

    def add_request(self, prompt, params, request_id=None, priority=0):
        self.waiting.add(request_id)

    def check_prompt(self, ids, params):
        pass

    def check_priority(self, priority):
        pass

    def abort(self, request_id):
        self.waiting.discard(request_id)

    def has_unfinished(self):
        return bool(self.waiting)

    def step(self):
        self.release.wait(30)
        raise self.error_cls("rank 1 died (exit code -9)")

    def stats(self):
        return {"layout": "tp", "running": 0, "waiting": len(self.waiting), "kv_usage": 0.0,
                "preemptions": 0, "prefix_cache_query_tokens": 0, "prefix_cache_hit_tokens": 0}

    def shutdown(self):
        pass


def test_queue_bound_and_engine_failure():
    from moebius.server.async_engine import AsyncEngine, EngineDeadError, QueueFullError

    async def go():
        engine = FakeEngine()
        aengine = AsyncEngine(engine, max_queue=2)
        aengine.start()
        params = SamplingParams(max_tokens=2)

        async def consume(rid):
            return [o async for o in aengine.generate([1], params, rid)]

        tasks = [asyncio.create_task(consume(f"r{i}")) for i in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFullError):
            await consume("r2")
        engine.release.set()
        for t in tasks:
            with pytest.raises(EngineDeadError, match="rank 1 died"):
                await t
        assert not aengine.healthy
        with pytest.raises(EngineDeadError):
            aengine.check_admission()
        await aengine.shutdown()

    asyncio.run(go())


def test_http_status_for_full_queue_and_dead_engine():
    from fastapi.testclient import TestClient

    from moebius.server.api import create_app

    engine = FakeEngine()
    app = create_app(engine, "fake", max_queue=0)
    with TestClient(app) as c:
        body = {"model": "fake", "prompt": "hi", "max_tokens": 2}
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 429 and r.headers["retry-after"] and r.json()["error"]
        app.state.engine.max_queue = 4
        engine.release.set()
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 503 and "rank 1 died" in r.json()["error"]["message"]
        health = c.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 503
