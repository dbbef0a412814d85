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
non-strict function calling does not hold outputs to them either, unless the function says
``strict: true``; what the compiler cannot enforce is a 400 that names the function. The
finish reason is the engine's ("stop"), as OpenAI and vLLM answer a forced call. Streamed, a
named function's arguments go out as the model writes them (what instructor-style partial
parsing reads) and "required" calls one by one as each closes; the streamed calls always
equal the non-streamed response's.
"""

from __future__ import annotations

import json

from moebius.guided.json_schema import SchemaError, compiled, loosened
from moebius.server.tool_parsers import ParsedOutput, ToolCall, ToolParser, _call_id

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
        spec = fn.get("parameters") or ANY_OBJECT
        if not fn.get("strict"):  # OpenAI's strict functions keep every keyword, or a 400
            spec = loosened(spec)
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
    """Reads the output of ``forced_schema``. A named function's call has the text as its
    arguments, as written (cut off by max_tokens, a prefix of them, as OpenAI and vLLM send
    it); under "required" each call object already closed is a call (its arguments the
    parameters' JSON), and with none closed the text is content. ``stream()`` sends the
    same calls as they come."""

    start = ""  # unused: forced calls stream through ForcedStream, not ToolCallStream
    finish_reason = None  # the engine's

    def __init__(self, name: str | None) -> None:
        self.name = name

    def parse(self, text: str) -> ParsedOutput:
        if self.name is not None:
            return ParsedOutput(None, [ToolCall(self.name, text)])
        calls = _calls(text, CallSpans().feed(text))
        return ParsedOutput(None, calls) if calls else ParsedOutput(text, [])

    def stream(self) -> ForcedStream:
        return ForcedStream(self)


class CallSpans:
    """Finds the call objects of a "required" output as its text grows: (start, end) of each
    object that closed at depth 2 (inside the list) since the last ``feed``."""

    def __init__(self) -> None:
        self.pos, self.depth, self.in_string, self.escaped, self.opened = 0, 0, False, False, 0

    def feed(self, text: str) -> list[tuple[int, int]]:
        spans = []
        for i in range(self.pos, len(text)):
            ch = text[i]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
                if self.depth == 2:
                    self.opened = i
            elif ch in "}]":
                if self.depth == 2:
                    spans.append((self.opened, i + 1))
                self.depth -= 1
        self.pos = len(text)
        return spans


def _calls(text: str, spans: list[tuple[int, int]]) -> list[ToolCall]:
    """The calls in those spans of ``text``: {"name": ..., "parameters": ...} objects, as the
    grammar writes them (anything else, which only a test's script can write, is skipped)."""
    calls = []
    for a, b in spans:
        try:
            obj = json.loads(text[a:b])
            name, params = obj["name"], obj["parameters"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(name, str):
            calls.append(ToolCall(name, json.dumps(params, ensure_ascii=False)))
    return calls


class ForcedStream:
    """One streamed choice of a forced call: ``feed(text)`` (the text so far, only growing)
    answers the ``delta.tool_calls`` entries to send now. A named function's arguments
    stream as the model writes them (its first entry carries the id and name); under
    "required" each call goes out whole once its object closes. ``calls``: entries sent."""

    def __init__(self, parser: ForcedCalls) -> None:
        self.parser, self.calls, self.sent = parser, 0, 0
        self.spans = CallSpans()

    def feed(self, text: str) -> list[dict]:
        if self.parser.name is None:
            out = [{"index": self.calls + k, **call.to_openai()}
                   for k, call in enumerate(_calls(text, self.spans.feed(text)))]
            self.calls += len(out)
            return out
        if len(text) == self.sent:
            return []
        entry = {"index": 0, "function": {"arguments": text[self.sent:]}}
        if self.calls == 0:
            entry = {**entry, "id": _call_id(), "type": "function",
                     "function": {"name": self.parser.name, **entry["function"]}}
            self.calls = 1
        self.sent = len(text)
        return [entry]
