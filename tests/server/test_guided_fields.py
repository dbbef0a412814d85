"""How a request's guided-decoding fields become the engine's SamplingParams (no model):
response_format json_schema enforces every keyword or refuses it when strict, and keeps the
structure without the bounds on values otherwise (OpenAI's default); vLLM's guided_json is
always enforced whole; vLLM's newer structured_outputs maps onto the same fields; a forced
tool_choice carries its own schema and excludes the others."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from moebius.core import SamplingError
from moebius.server import protocol as P
from moebius.server.tool_choice import forced_schema

BOUNDED = {"type": "object", "required": ["n"], "properties": {
    "n": {"type": "integer", "minimum": 1}, "s": {"type": "string", "maxLength": 4}}}
LOOSE = {"type": "object", "required": ["n"], "properties": {
    "n": {"type": "integer"}, "s": {"type": "string"}}}
ASK = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": BOUNDED}}]


def params(**body):
    req = P.ChatCompletionRequest.model_validate({"model": "m", "messages": ASK, **body})
    return req.sampling_params(16, None)


def fmt(strict):
    schema = {"name": "x", "schema": BOUNDED}
    if strict is not None:
        schema["strict"] = strict
    return {"type": "json_schema", "json_schema": schema}


@pytest.mark.parametrize("strict", [None, False])
def test_a_non_strict_schema_keeps_its_structure_without_bounds(strict):
    assert params(response_format=fmt(strict)).guided_json == LOOSE


def test_a_strict_schema_or_guided_json_is_enforced_whole_or_refused():
    for body in ({"response_format": fmt(True)}, {"guided_json": BOUNDED}):
        with pytest.raises(SamplingError, match="minimum cannot be enforced"):
            params(**body)
    assert params(guided_json=LOOSE).guided_json == LOOSE


def test_a_forced_tool_choice_carries_its_schema_and_excludes_other_guides():
    named = {"type": "function", "function": {"name": "f"}}
    assert params(tools=TOOLS, tool_choice=named).guided_json == forced_schema(TOOLS, "f", True)
    assert params(tools=TOOLS, tool_choice="required",
                  parallel_tool_calls=False).guided_json["maxItems"] == 1
    assert params(tools=TOOLS).guided_json is None  # auto: read, not forced
    for extra in ({"response_format": {"type": "json_object"}}, {"guided_choice": ["a"]},
                  {"guided_json": LOOSE}):
        with pytest.raises(SamplingError, match="forces the output's form"):
            params(tools=TOOLS, tool_choice="required", **extra)


def test_structured_outputs_map_onto_the_guided_fields():
    assert params(structured_outputs={"json": LOOSE}).guided_json == LOOSE
    assert params(structured_outputs={"json": {}}).guided_json == {}
    assert params(structured_outputs={"regex": "a+"}).guided_regex == "a+"
    assert params(structured_outputs={"choice": ["a", "b"]}).guided_choice == ["a", "b"]
    assert params(structured_outputs={"json_object": True}).guided_json_object
    assert params(structured_outputs={"json": {}, "disable_any_whitespace": True}
                  ).guided_compact_json
    assert params(structured_outputs={"choice": ["a"], "disable_fallback": True,
                                      "disable_additional_properties": True}).guided
    for so, match in [({"grammar": "root ::= x"}, "structured_outputs.grammar cannot"),
                      ({"structural_tag": "{}"}, "structural_tag cannot"),
                      ({"whitespace_pattern": " "}, "whitespace_pattern cannot"),
                      ({"regex": "a", "choice": ["a"]}, "exclude each other"),
                      ({"json": {"type": "integer", "minimum": 1}}, "minimum cannot be")]:
        with pytest.raises(SamplingError, match=match):
            params(structured_outputs=so)
    with pytest.raises(SamplingError, match="structured_outputs and response_format"):
        params(structured_outputs={"regex": "a"}, guided_json={})
    with pytest.raises(ValidationError, match="structured_outputs.backend"):
        params(structured_outputs={"regex": "a", "backend": "xgrammar"})
