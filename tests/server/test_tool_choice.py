"""The schemas that force tool calls (tool_choice "required" or a named function) hold an
output to the calls of the request's tools and no others, and their parser reads them back.
The server round trip is in test_tool_calls.py, the real engine's in test_openai_e2e.py."""

from __future__ import annotations

import json

import pytest

from moebius.guided import json_grammar as jg
from moebius.guided.json_schema import Schema
from moebius.server.tool_choice import ForcedCalls, forced_schema

# pydantic's shape for one (its own $defs and $ref, a bound on a value), none for the other
TOOLS = [
    {"type": "function", "function": {"name": "book", "parameters": {
        "$defs": {"Day": {"type": "string", "format": "date"}},
        "type": "object", "required": ["day"], "properties": {
            "day": {"$ref": "#/$defs/Day"}, "seats": {"type": "integer", "minimum": 1}}}}},
    {"type": "function", "function": {"name": "clock"}},
    {"type": "function", "function": {"name": "book_v2", "parameters": {
        "type": "object", "required": ["id"], "properties": {"id": {"type": "integer"}}}}},
]


def whole(schema, text: str) -> bool:
    s = Schema(schema)
    return s.complete(jg.advance(s.start, text.encode(), s.step))


@pytest.mark.parametrize("parallel", [True, False])
def test_required_holds_the_output_to_calls_of_the_tools(parallel):
    schema = forced_schema(TOOLS, None, parallel)
    one = '[{"name": "book", "parameters": {"day": "2026-12-07", "seats": 2}}]'
    two = '[{"name":"book_v2","parameters":{"id":3}}, {"name": "clock", "parameters": {"x": []}}]'
    assert whole(schema, one) and whole(schema, two) == parallel
    for bad in ["[]", '{"name": "book", "parameters": {"day": "x"}}',
                '[{"name": "book", "parameters": {"id": 3}}]',  # book_v2's arguments
                '[{"name": "book_v2", "parameters": {"day": "x"}}]',
                '[{"name": "nope", "parameters": {}}]', '[{"parameters": {}, "name": "clock"}]',
                '[{"name": "clock"}]', '[{"name": "clock", "parameters": []}]']:
        assert not whole(schema, bad), bad


def test_a_named_function_holds_the_output_to_its_arguments():
    schema = forced_schema(TOOLS, "book", True)
    assert whole(schema, '{"day": "monday", "seats": 0}')  # bounds on values are dropped
    assert not whole(schema, '{"seats": 1}') and not whole(schema, '[{"day": "x"}]')
    assert whole(forced_schema(TOOLS, "clock", True), '{"anything": [1, {}]}')


def test_a_strict_function_keeps_its_bounds_or_is_refused():
    strict = [{"type": "function", "function": {**TOOLS[0]["function"], "strict": True}}]
    with pytest.raises(ValueError, match="function 'book' cannot be enforced: .*format"):
        forced_schema(strict, "book", True)


def test_the_forced_output_reads_back_as_calls():
    calls = ForcedCalls(None).parse('[{"name": "book", "parameters": {"day": "Zürich"}}, '
                                    '{"name": "clock", "parameters": {}}]')
    assert calls.content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls.tool_calls] == [
        ("book", {"day": "Zürich"}), ("clock", {})]
    assert "Zürich" in calls.tool_calls[0].arguments  # non-ASCII kept, as OpenAI sends it
    named = ForcedCalls("book").parse('{"day": "x"}')
    assert [(c.name, c.arguments) for c in named.tool_calls] == [("book", '{"day": "x"}')]
    # cut off by max_tokens: a named call keeps what was written of its arguments (OpenAI's
    # and vLLM's answer); "required" keeps the calls whose objects closed, else the text is
    # content (and what no grammar writes is no call)
    assert [(c.name, c.arguments) for c in ForcedCalls("book").parse('{"day"').tool_calls] == [
        ("book", '{"day"')]
    cut = ForcedCalls(None).parse('[{"name": "clock", "parameters": {}}, {"name": "bo')
    assert (cut.content, [c.name for c in cut.tool_calls]) == (None, ["clock"])
    for text in ['[{"name": "bo', "[]", '[{"name": 1, "parameters": {}}]', '[{"name": "x"}]']:
        assert (ForcedCalls(None).parse(text).content,
                ForcedCalls(None).parse(text).tool_calls) == (text, [])
