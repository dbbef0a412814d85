"""The hermes tool-call parser and the streaming hold-back: one call, several, text before,
malformed or cut-off JSON left as content, and streams split at every boundary (inside the
start tag too) that never leak a piece of a call as content."""

from __future__ import annotations

import json

import pytest

from moebius.server.tool_parsers import (
    HermesToolParser,
    ToolCallConfig,
    ToolCallStream,
    _partial_tag,
)

PARSER = HermesToolParser()
WEATHER = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}'
           "\n</tool_call>")
CLOCK = '<tool_call>\n{"name": "clock", "arguments": {}}\n</tool_call>'


def test_one_call():
    out = PARSER.parse(WEATHER)
    assert out.content is None and len(out.tool_calls) == 1
    call = out.tool_calls[0]
    assert call.name == "get_weather"
    assert call.arguments == '{"city": "Zürich", "days": 2}'  # JSON text, non-ASCII kept
    assert call.id.startswith("call_") and len(call.id) > 10
    assert call.to_openai() == {"id": call.id, "type": "function", "function": {
        "name": "get_weather", "arguments": call.arguments}}


def test_two_calls_text_before_and_after():
    out = PARSER.parse("Let me look.\n" + WEATHER + "\n" + CLOCK + "\n")
    assert out.content == "Let me look.\n"
    assert [c.name for c in out.tool_calls] == ["get_weather", "clock"]
    assert [json.loads(c.arguments) for c in out.tool_calls] == [{"city": "Zürich", "days": 2}, {}]
    assert len({c.id for c in out.tool_calls}) == 2


def test_compact_and_odd_but_valid_calls():
    out = PARSER.parse('<tool_call>{"name":"f"}</tool_call><tool_call>{"name": "g", '
                       '"arguments": "{\\"x\\": [1, null]}"}</tool_call>')
    assert [(c.name, c.arguments) for c in out.tool_calls] == [("f", "{}"),
                                                               ("g", '{"x": [1, null]}')]


@pytest.mark.parametrize("text", [
    "no calls here, just < and > and tool_call",
    "",
    '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>',  # one brace short
    '<tool_call>\n{"name": "get_weather", "arguments": {"ci',  # cut off by max_tokens
    '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
    '<tool_call>\n["f", {}]\n</tool_call>',  # not an object
    '<tool_call>\n{"name": "f", "arguments": "{not json"}\n</tool_call>',
    WEATHER + "\n<tool_call>\nnot json\n</tool_call>",  # one good call, one bad: no calls
    WEATHER + "\n<tool_call>\n",  # the second call cut off
])
def test_no_or_malformed_calls_leave_the_text_as_content(text):
    out = PARSER.parse(text)
    assert out.tool_calls == [] and out.content == text


def test_partial_tag():
    assert _partial_tag("Hi <tool_c", "<tool_call>") == 7
    assert _partial_tag("Hi <", "<tool_call>") == 1
    assert _partial_tag("Hi <tool_call>", "<tool_call>") == 0  # whole: found, not partial
    assert _partial_tag("Hi <x", "<tool_call>") == 0
    assert _partial_tag("", "<tool_call>") == 0


def stream_content(text: str, cuts: list[int]) -> list[int]:
    """``content_end`` as a stream sees ``text`` grow through ``cuts``."""
    stream = ToolCallStream(PARSER)
    ends = [stream.content_end(text[:n]) for n in cuts]
    assert ends == sorted(ends), "content never shrinks"
    return ends


@pytest.mark.parametrize("text", [
    "Let me look. " + WEATHER + "\n" + CLOCK,
    WEATHER,
    "a < b and <tool_ca is not a tag, <tool_call> is",
    "plain text < with a late <",
    "<<tool_call>" + CLOCK,
])
def test_stream_split_at_every_boundary_never_leaks_a_call(text):
    first = text.find("<tool_call>")
    cuts = list(range(len(text) + 1))
    ends = stream_content(text, cuts)
    for n, end in zip(cuts, ends, strict=True):
        if first < 0 or n <= first:  # everything not possibly a tag prefix is released
            assert end == n - _partial_tag(text[:n], "<tool_call>")
        else:
            assert end == first
    parsed = PARSER.parse(text)
    if parsed.tool_calls:  # the content streamed is the parsed content
        assert text[: ends[-1]] == (parsed.content or "")


def test_stream_in_big_and_odd_steps():
    text = "Sure. " + WEATHER + CLOCK
    for cuts in ([len(text)], [3, 8, 9, len(text)], [7, 10, 16, 17, 60, len(text)]):
        assert stream_content(text, cuts)[-1] == len("Sure. ")


def test_config_is_checked():
    assert ToolCallConfig().make_parser() is None
    assert isinstance(ToolCallConfig("hermes", True).make_parser(), HermesToolParser)
    with pytest.raises(ValueError, match="unknown --tool-call-parser 'nope'; known: hermes"):
        ToolCallConfig("nope")
    with pytest.raises(ValueError, match="needs --tool-call-parser"):
        ToolCallConfig(None, enable_auto_tool_choice=True)
