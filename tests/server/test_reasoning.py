"""``--reasoning-parser``: the <think> block of a chat output goes to reasoning_content, the
rest to content (where tool calls are read), and a stream cut at every token sends the same
split. The scripted engine of test_tool_calls.py plays the model."""

from __future__ import annotations

import pytest
from openai.types.chat import ChatCompletionChunk

from moebius.server.reasoning import PARSERS
from moebius.server.tool_parsers import ToolCallConfig
from tests.server.test_tool_calls import CALLS, TOOLS, ScriptedEngine, whole_and_events

QWEN, R1 = PARSERS["qwen3"], PARSERS["deepseek_r1"]


@pytest.mark.parametrize("parser,text,want", [
    (QWEN, "<think>\nhmm\n</think>\n\nHi!", ("\nhmm\n", "\n\nHi!")),
    (QWEN, "Hi! </think> no", (None, "Hi! </think> no")),  # no block opened: all content
    (QWEN, "<think>cut off", ("cut off", "")),
    (R1, "hmm</think>Hi!", ("hmm", "Hi!")),
    (R1, "<think>hmm</think>Hi!", ("hmm", "Hi!")),
    (R1, "still thinking", ("still thinking", "")),
])
def test_split(parser, text, want):
    assert parser.split(text) == want


@pytest.mark.parametrize("parser", ["qwen3", "deepseek_r1"])
@pytest.mark.parametrize("script,tools", [
    ("<think>\nThe user wants <b>bold</b>; <thin\n</think>\n\nHere: **x**", False),
    ("<think>check the weather</think>\n" + CALLS, True),
    ("<think>never closed, then cut", False),
])
def test_streams_split_as_the_whole_response(qwen_dir, parser, script, tools):
    engine = ScriptedEngine(qwen_dir, script)
    config = ToolCallConfig("hermes", tools, parser)
    body = {"max_tokens": 300, **({"tools": TOOLS} if tools else {})}
    whole, events = whole_and_events(engine, body, config)
    chunks = [ChatCompletionChunk.model_validate_json(e[6:]) for e in events[:-1]]
    deltas = [c.choices[0].delta for c in chunks]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    msg = whole["message"]
    assert reasoning == (msg["reasoning_content"] or "")
    assert "".join(d.content or "" for d in deltas) == (msg["content"] or "")
    calls = [t.function.name for d in deltas for t in d.tool_calls or []]
    assert calls == [t["function"]["name"] for t in msg["tool_calls"] or []]
    assert "<think>" not in reasoning and "</think>" not in (msg["content"] or "")
    assert len([d for d in deltas if getattr(d, "reasoning_content", None)]) > 3  # as it came
    if tools:
        assert calls == ["get_weather", "clock"] and msg["reasoning_content"]
    if script.startswith("<think>never"):
        assert msg["reasoning_content"] == "never closed, then cut" and msg["content"] is None
