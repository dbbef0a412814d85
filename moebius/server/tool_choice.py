"""``tool_choice`` "required" and a named function: calls forced by guided decoding.

As vLLM does, the output is held to a JSON schema (moebius/guided) built from the request's
tools, so a call comes whatever the model would have written, on any server (no
``--tool-call-parser`` needed):

- a named function: the output is that function's arguments, an object of its
  ``parameters`` schema;
- "required": the output is a list of calls, ``[{"name": ..., "parameters": {...}}, ...]``,
  one or more (exactly one with ``parallel_tool_calls: false``); each item is a union of the
  tools told apart by ``name``, so the arguments are held to the chosen tool's schema.

Parameters are held to their structure (types, properties, required, enums, items); bounds
on values (minimum, maxLength, pattern, format, ...) are dropped (``loosened``), as OpenAI's
non-strict function calling does not hold outputs to them either; what the compiler cannot
enforce at all is a 400 that names the function. The finish reason is the engine's ("stop"),
as OpenAI and vLLM answer a forced call.
"""

from __future__ import annotations

import json

from moebius.guided.json_schema import SchemaError, compiled, loosened
from moebius.server.tool_parsers import ParsedOutput, ToolCall, ToolParser

ANY_OBJECT = {"type": "object"}  # a function without a parameters schema


def forced_schema(tools: list[dict], name: str | None, parallel: bool) -> dict:
    """The schema that forces the calls: of function ``name``, or "required" (None).
    ``tools`` are the request's ``{"type": "function", "function": {...}}`` definitions.
    ValueError (a 400) where a function's parameters cannot be enforced."""
    params = {}
    for tool in tools:
        fn = tool["function"]
        if name is not None and fn["name"] != name:
            continue
        spec = loosened(fn.get("parameters") or ANY_OBJECT)
        try:
            compiled(spec)
        except SchemaError as e:
            raise ValueError(f"tool_choice: the parameters of function {fn['name']!r} cannot "
                             f"be enforced: {e}") from None
        params[fn["name"]] = spec
    if name is not None:
        return params[name]
    # each function's parameters under the root's $defs, its own $refs rebased onto them
    defs = {f"f{i}": _rebased(p, f"#/$defs/f{i}") for i, p in enumerate(params.values())}
    calls = [{"type": "object", "required": ["name", "parameters"], "properties": {
        "name": {"const": n}, "parameters": {"$ref": f"#/$defs/f{i}"}}}
        for i, n in enumerate(params)]
    items = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema = {"type": "array", "minItems": 1, "items": items, "$defs": defs}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def _rebased(s, root: str):
    """``s`` with each local ``$ref`` ("#/...") pointing below ``root`` instead of "#"."""
    if isinstance(s, list):
        return [_rebased(v, root) for v in s]
    if not isinstance(s, dict):
        return s
    out = {}
    for k, v in s.items():
        if k == "$ref" and isinstance(v, str) and v.startswith("#"):
            out[k] = root + v[1:]
        elif k in ("enum", "const", "default", "examples"):  # values, not schemas
            out[k] = v
        else:
            out[k] = _rebased(v, root)
    return out


class ForcedCalls(ToolParser):
    """Reads the output of ``forced_schema``: the calls, or (cut off by max_tokens) the text
    as content. Nothing of it is content while it streams."""

    start = ""
    finish_reason = None  # the engine's

    def __init__(self, name: str | None) -> None:
        self.name = name

    def parse(self, text: str) -> ParsedOutput:
        try:
            value = json.loads(text)
            calls = ([(self.name, value)] if self.name is not None
                     else [(c["name"], c["parameters"]) for c in value])
        except (ValueError, TypeError, KeyError):  # cut off (the grammar allows no other)
            return ParsedOutput(text, [])
        if not calls or any(not isinstance(a, dict) or not isinstance(n, str) for n, a in calls):
            return ParsedOutput(text, [])
        return ParsedOutput(None, [ToolCall(n, json.dumps(a, ensure_ascii=False))
                                   for n, a in calls])
