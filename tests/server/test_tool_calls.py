"""Tool calls through the server's own stack (FastAPI app, AsyncEngine, Responder, hermes
parser) driven by the official ``openai`` client, in process. The tiny model writes random
tokens, so here the model alone is scripted: ``ScriptedEngine`` answers every request with a
fixed text, as the real tokenizer's ids, one token per step, detokenized incrementally as the
engine does (so streams split inside ``<tool_call>``). The real engine and prompt side are
covered in test_openai_e2e.py; the request checks (400s) need no model at all. The server's
AsyncEngine hands a lagging reader only the newest output, so one test drives the Responder
with every output, to see a stream cut at every token boundary."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import openai
import pytest
from fastapi.testclient import TestClient
from openai.types.chat import ChatCompletionChunk

from moebius.core import CompletionOutput, RequestOutput
from moebius.server import protocol as P
from moebius.server.api import create_app
from moebius.server.responses import Responder
from moebius.server.tool_choice import forced_schema
from moebius.server.tool_parsers import ToolCallConfig
from moebius.tokenizer import IncrementalDetokenizer, Tokenizer

CALLS = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "unit": "C"}}\n'
    "</tool_call>\n<tool_call>\n"
    '{"name": "clock", "arguments": {}}\n</tool_call>'
)
TWO_CALLS = "Let me check.\n" + CALLS
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather now",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "clock"}},
]
ASK = [{"role": "user", "content": "Weather in Zürich, and the time?"}]
HERMES = ToolCallConfig("hermes", enable_auto_tool_choice=True)


class ScriptedEngine:
    """Just enough of ``LLMEngine`` for the server; every completion is ``self.script``."""

    def __init__(self, model_dir: str, script: str = TWO_CALLS) -> None:
        self.tokenizer = Tokenizer(model_dir)
        self.script = script
        self.cfg = SimpleNamespace(context_len=4096, model_dir=model_dir, ranks=1,
                                   model=SimpleNamespace(vocab_size=self.tokenizer.vocab_size))
        self.switches, self.layout, self.weight_updates = [], "tp", []
        self.running: dict[str, list] = {}
        self.prompts: list[list[int]] = []  # every prompt received
        self.params: list = []  # and its sampling parameters

    def add_request(self, prompt, params, request_id=None, priority=0):
        ids = self.tokenizer.encode(self.script, add_special_tokens=False)
        dets = [IncrementalDetokenizer(self.tokenizer) for _ in range(params.n)]
        self.running[request_id] = [list(prompt), params, ids, dets, 0]
        self.prompts.append(list(prompt))
        self.params.append(params)

    def check_prompt(self, ids, params):
        pass

    def check_priority(self, priority):
        pass

    def abort(self, request_id):
        self.running.pop(request_id, None)

    def has_unfinished(self):
        return bool(self.running)

    def step(self) -> list[RequestOutput]:
        outs = []
        for rid, state in list(self.running.items()):
            prompt, params, ids, dets, k = state
            state[4] = k = k + 1
            reason = "stop" if k >= len(ids) else "length" if k >= params.max_tokens else None
            outputs = []
            for j, det in enumerate(dets):
                det.step(ids, k)
                outputs.append(CompletionOutput(j, det.text, ids[:k], None, None, reason))
            outs.append(RequestOutput(rid, None, prompt, outputs, reason is not None))
            if reason is not None:
                del self.running[rid]
        return outs

    def stats(self):
        return {"layout": "tp", "running": len(self.running), "waiting": 0, "kv_usage": 0.0,
                "preemptions": 0, "prefix_cache_query_tokens": 0, "prefix_cache_hit_tokens": 0}

    def shutdown(self):
        pass


def open_app(app, opened: list) -> tuple[TestClient, openai.OpenAI]:
    """A started in-process client of ``app`` (appended to ``opened``, for the fixture to
    close) and the official openai client over it."""
    http = TestClient(app)
    http.__enter__()
    opened.append(http)
    return http, openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http,
                               max_retries=0)


@pytest.fixture
def serve(qwen_dir, tools_template_path):
    """``serve(script, tool_calls)`` -> (openai client, engine), closed after the test."""
    opened = []

    def start(script: str = TWO_CALLS, tool_calls: ToolCallConfig | None = HERMES):
        engine = ScriptedEngine(qwen_dir, script)
        engine.tokenizer = Tokenizer(qwen_dir, tools_template_path)
        _, client = open_app(create_app(engine, "tiny", tool_calls=tool_calls), opened)
        return client, engine

    yield start
    for http in opened:
        http.__exit__(None, None, None)


def streamed(client, **kw) -> SimpleNamespace:
    """A stream's content, tool calls (merged by index) and finish reason."""
    chunks = list(client.chat.completions.create(model="tiny", stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    content, calls, finish = "", {}, []
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
                calls[d.index]["arguments"] += d.function.arguments or ""
            if choice.finish_reason:
                finish.append(choice.finish_reason)
    return SimpleNamespace(content=content, calls=[calls[i] for i in sorted(calls)],
                           finish=finish, chunks=chunks)


def test_calls_in_the_output_become_tool_calls(serve):
    client, engine = serve()
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=200)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check.\n"
    calls = choice.message.tool_calls
    assert [(c.type, c.function.name) for c in calls] == [("function", "get_weather"),
                                                          ("function", "clock")]
    assert json.loads(calls[0].function.arguments) == {"city": "Zürich", "unit": "C"}
    assert calls[1].function.arguments == "{}"
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id
    assert r.usage.completion_tokens == len(engine.tokenizer.encode(TWO_CALLS))

    s = streamed(client, messages=ASK, tools=TOOLS, max_tokens=200, stop=["never written"],
                 stream_options={"include_usage": True})
    assert s.content == "Let me check.\n"  # nothing of the calls leaked as content
    assert [(c["name"], c["arguments"]) for c in s.calls] == [
        (c.function.name, c.function.arguments) for c in calls]
    assert all(c["id"].startswith("call_") for c in s.calls)
    assert s.finish == ["tool_calls"]
    assert s.chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # the prompt carried the tools (the Qwen-style template writes them in a system turn)
    want = engine.tokenizer.apply_chat_template(ASK, True, None, TOOLS)
    assert "<tools>" in want and engine.prompts[0] == engine.tokenizer.encode(want, False)


class EveryOutput:
    """The AsyncEngine's ``generate`` without its skipping: every step's output reaches the
    Responder, so the stream meets every token boundary."""

    def __init__(self, engine: ScriptedEngine) -> None:
        self.engine = engine

    async def generate(self, prompt, params, request_id, priority=0):
        self.engine.add_request(prompt, params, request_id)
        while request_id in self.engine.running:
            for out in self.engine.step():
                yield out


def whole_and_events(engine: ScriptedEngine, body: dict,
                     config: ToolCallConfig = HERMES) -> tuple[dict, list[str]]:
    """The chat request ``body`` (with ASK) answered whole (its first choice) and streamed
    (the server-sent events), every output of ``engine`` reaching the Responder."""
    responder = Responder(EveryOutput(engine), "tiny", config)
    body = {"model": "tiny", "messages": ASK, **body}

    async def run(stream: bool):
        job = responder.prepare_chat(P.ChatCompletionRequest.model_validate(body))
        if not stream:
            return await responder.collect(job)
        return [e async for e in responder.stream(job)]

    return asyncio.run(run(False))["choices"][0], asyncio.run(run(True))


@pytest.mark.parametrize("script", [
    TWO_CALLS,
    CALLS,
    "x <tool_call>\n{bad json}\n</tool_call> y",
    "a < b, and <tool_c is no tag <",
])
def test_streams_cut_at_every_token(qwen_dir, script):
    engine = ScriptedEngine(qwen_dir, script)
    whole, events = whole_and_events(engine, {"tools": TOOLS, "max_tokens": 300})
    assert len(events) > len(engine.tokenizer.encode(script)) / 2  # about one per token
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [ChatCompletionChunk.model_validate_json(e[6:]) for e in events[:-1]]
    deltas = [c.choices[0].delta for c in chunks]
    content = "".join(d.content or "" for d in deltas)
    calls = [c.model_dump() for d in deltas for c in d.tool_calls or []]
    assert content == (whole["message"]["content"] or "")
    assert [c["index"] for c in calls] == list(range(len(whole["message"]["tool_calls"] or [])))
    assert [c["function"] for c in calls] == [
        c["function"] for c in whole["message"]["tool_calls"] or []]
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [
        whole["finish_reason"]]


def test_parallel_tool_calls_false_keeps_the_first(serve):
    client, _ = serve()
    kw = dict(messages=ASK, tools=TOOLS, max_tokens=200, parallel_tool_calls=False)
    r = client.chat.completions.create(model="tiny", **kw)
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_weather"]
    assert [c["name"] for c in streamed(client, **kw).calls] == ["get_weather"]


@pytest.mark.parametrize("script,max_tokens,finish", [
    ('Sure: <tool_call>\n{"name": "clock", "arguments": {}\n</tool_call> done', 200, "stop"),
    (TWO_CALLS, 30, "length"),  # cut off inside the first call
    ("a < b, and <tool_c is no tag", 200, "stop"),
])
def test_malformed_or_cut_off_calls_stay_content(serve, qwen_dir, script, max_tokens, finish):
    client, engine = serve(script)
    ids = engine.tokenizer.encode(script, add_special_tokens=False)
    text = engine.tokenizer.decode(ids[:max_tokens])
    kw = dict(messages=ASK, tools=TOOLS, max_tokens=max_tokens)
    r = client.chat.completions.create(model="tiny", **kw).choices[0]
    assert (r.message.content, r.message.tool_calls, r.finish_reason) == (text, None, finish)
    s = streamed(client, **kw)
    assert (s.content, s.calls, s.finish) == (text, [], [finish])


def test_without_tools_or_with_choice_none_the_text_is_content(serve):
    client, engine = serve()
    for kw in ({}, {"tools": TOOLS, "tool_choice": "none"}):
        r = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=200, **kw)
        assert r.choices[0].message.content == TWO_CALLS and not r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "stop"
    plain = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(ASK), False)
    assert engine.prompts == [plain, plain]  # "none" renders no tools


def test_n_choices_each_get_calls(serve):
    client, _ = serve()
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=200,
                                       n=2, temperature=1)
    assert [c.finish_reason for c in r.choices] == ["tool_calls"] * 2
    ids = [t.id for c in r.choices for t in c.message.tool_calls]
    assert len(set(ids)) == 4


FORCED = ('[{"name": "get_weather", "parameters": {"city": "Zürich"}}, '
          '{"name": "clock", "parameters": {}}]')


@pytest.mark.parametrize("tool_calls", [HERMES, None])
def test_required_and_named_choice_force_the_calls(serve, tool_calls):
    """The engine gets the forced schema (moebius/server/tool_choice.py), on a server with or
    without a parser; the forced output comes back as calls, finish "stop" as OpenAI's."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice, script, want in [
            ("required", FORCED, [("get_weather", {"city": "Zürich"}), ("clock", {})]),
            (named, '{"city": "Zürich"}', [("get_weather", {"city": "Zürich"})])]:
        client, engine = serve(script, tool_calls)
        kw = dict(messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=200)
        r = client.chat.completions.create(model="tiny", **kw).choices[0]
        got = [(t.function.name, json.loads(t.function.arguments)) for t in r.message.tool_calls]
        assert (got, r.message.content, r.finish_reason) == (want, None, "stop")
        s = streamed(client, **kw)
        assert [(c["name"], json.loads(c["arguments"])) for c in s.calls] == want
        assert (s.content, s.finish) == ("", ["stop"])
        schema = engine.params[0].guided_json
        assert schema == forced_schema(TOOLS, None if choice == "required" else "get_weather",
                                       True)
    # cut off by max_tokens: the text as written, no calls
    client, engine = serve(FORCED, tool_calls)
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=5,
                                       tool_choice="required").choices[0]
    assert (r.message.tool_calls, r.finish_reason) == (None, "length")
    assert FORCED.startswith(r.message.content)


NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize("choice,script,max_tokens", [
    ("required", FORCED, 300), ("required", FORCED, 60), ("required", FORCED, 4),
    (NAMED, '{"city": "Zürich", "unit": "C"}', 300), (NAMED, '{"city": "Zürich"}', 3)])
def test_forced_streams_equal_the_whole_response_at_every_token(qwen_dir, choice, script,
                                                               max_tokens):
    """A named function's arguments stream as written (several entries of index 0), each
    "required" call once its object closes; merged by index they are the non-streamed calls,
    whole or cut off by max_tokens (60 tokens: after the first "required" call, 4: before)."""
    body = {"tools": TOOLS, "max_tokens": max_tokens, "tool_choice": choice}
    whole, events = whole_and_events(ScriptedEngine(qwen_dir, script), body)
    chunks = [ChatCompletionChunk.model_validate_json(e[6:]) for e in events[:-1]]
    deltas = [c.choices[0].delta for c in chunks]
    entries = [t for d in deltas for t in d.tool_calls or []]
    merged = {}
    for t in entries:
        if t.index not in merged:
            merged[t.index] = [t.id, t.function.name, ""]
        merged[t.index][2] += t.function.arguments or ""
    want = whole["message"]["tool_calls"] or []
    assert [m[1:] for _, m in sorted(merged.items())] == [
        [c["function"]["name"], c["function"]["arguments"]] for c in want]
    assert all(m[0].startswith("call_") for m in merged.values())
    assert "".join(d.content or "" for d in deltas) == (whole["message"]["content"] or "")
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [
        whole["finish_reason"]]
    if choice == NAMED and max_tokens > 3:
        assert len(entries) > 3  # the arguments came as the model wrote them
    if max_tokens == 60:  # the first call had closed: it came, the cut second did not
        assert [c["function"]["name"] for c in want] == ["get_weather"]


def test_parallel_tool_calls_false_forces_one_call(serve):
    client, engine = serve(FORCED)
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=200,
                                       tool_choice="required", parallel_tool_calls=False)
    assert engine.params[0].guided_json["maxItems"] == 1
    assert [t.function.name for t in r.choices[0].message.tool_calls] == ["get_weather"]


BAD = [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "'nope' is not in tools"),
    ({"tool_choice": "required"}, "tool_choice: 'required' needs tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice 'required' forces the output's form"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "allOf": [{"type": "object"}]}}}], "tool_choice": "required"},
     "the parameters of function 'f' cannot be enforced: #: allOf"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.0.type"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]},
     "tools.0.function.name"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
      "function": {"name": "f", "arguments": "{not json"}}]}]},
     r"messages\[1\]\.tool_calls\[0\]\.function\.arguments is not valid JSON"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
      "function": {"name": "f"}}]}]}, "messages.1.tool_calls.0.function.arguments"),
]


@pytest.mark.parametrize("extra,match", BAD)
def test_bad_tool_fields_are_400(serve, extra, match):
    client, engine = serve()
    body = {"messages": ASK, "max_tokens": 4, **extra}
    with pytest.raises(openai.BadRequestError, match=match) as e:
        client.chat.completions.create(model="tiny", **body)
    assert e.value.body["type"] == "invalid_request_error"
    assert engine.prompts == []


def test_a_server_without_a_parser_refuses_auto(serve):
    client, _ = serve(tool_calls=None)
    with pytest.raises(openai.BadRequestError, match='"auto" tool choice requires '
                       "--enable-auto-tool-choice and --tool-call-parser"):
        client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=4)
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=200,
                                       tool_choice="none")
    assert r.choices[0].message.content == TWO_CALLS
    # a parser without --enable-auto-tool-choice does not serve auto either
    client, _ = serve(tool_calls=ToolCallConfig("hermes"))
    with pytest.raises(openai.BadRequestError, match="--enable-auto-tool-choice"):
        client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=4)
