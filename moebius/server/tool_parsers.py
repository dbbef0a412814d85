"""Tool calls in a chat completion's text: the parsers behind ``--tool-call-parser``, the
server's tool-call flags (``ToolCallConfig``), and ``ToolCallStream``, which decides while a
choice streams how much of its text is plain content.

hermes (Qwen2.5, Qwen3, NousHermes) writes each call as JSON between tags, several in a row::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A parse gives the content, the text before the first ``<tool_call>`` (None when empty), and the
calls, each with its arguments as a JSON text (non-ASCII kept) and a fresh ``call_...`` id; text
between and after calls is dropped, as the chat template writes none there. When any call is not
a JSON object with a string ``name`` (malformed, or cut off by max_tokens) there are no calls
and the whole text stays content: the client gets what the model wrote, never a guess.

Streaming: text before the first start tag streams as it comes, holding back a tail that could
still grow into the tag; from the tag on the text is kept until the choice finishes and is then
parsed whole, so a stream's content and calls always equal the non-streamed response's.
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolCall:
    """One call found in the output: OpenAI's ``{id, type: "function", function}``."""

    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=_call_id)

    def to_openai(self) -> dict:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None  # the whole text when there are no calls
    tool_calls: list[ToolCall]


class ToolParser(ABC):
    """Finds tool calls in a finished choice's text. ``start`` is the text that opens a call:
    ``ToolCallStream`` holds content back from its first appearance on."""

    start: str
    finish_reason: str | None = "tool_calls"  # a choice's with calls (None: the engine's)

    @abstractmethod
    def parse(self, text: str) -> ParsedOutput:
        """Content and calls of ``text``; never raises on what a model may write."""


class HermesToolParser(ToolParser):
    start, end = "<tool_call>", "</tool_call>"

    def parse(self, text: str) -> ParsedOutput:
        first = text.find(self.start)
        if first < 0:
            return ParsedOutput(text, [])
        calls, pos = [], first
        while pos >= 0:
            body_start = pos + len(self.start)
            body_end = text.find(self.end, body_start)
            call = _hermes_call(text[body_start:body_end]) if body_end >= 0 else None
            if call is None:  # malformed or unclosed: the text is content, as written
                return ParsedOutput(text, [])
            calls.append(call)
            pos = text.find(self.start, body_end + len(self.end))
        return ParsedOutput(text[:first] or None, calls)


def _hermes_call(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some fine-tunes write the arguments already encoded
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesToolParser}


@dataclass(frozen=True)
class ToolCallConfig:
    """The server's flags for reading chat outputs, vLLM's: ``--tool-call-parser NAME`` (how
    calls are found in the output), ``--enable-auto-tool-choice`` (serve ``tool_choice:
    "auto"``, the default when a request has tools; it needs a parser) and
    ``--reasoning-parser NAME`` (the reasoning before the content: moebius/server/
    reasoning.py)."""

    parser: str | None = None
    enable_auto_tool_choice: bool = False
    reasoning_parser: str | None = None

    def __post_init__(self) -> None:
        from moebius.server.reasoning import make

        make(self.reasoning_parser)  # ValueError for an unknown one
        if self.parser is not None and self.parser not in PARSERS:
            raise ValueError(
                f"unknown --tool-call-parser {self.parser!r}; known: {', '.join(sorted(PARSERS))}"
            )
        if self.enable_auto_tool_choice and self.parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (e.g. hermes)")

    def make_parser(self) -> ToolParser | None:
        return PARSERS[self.parser]() if self.parser else None


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ToolCallStream:
    """One streamed choice. Feed ``content_end`` the choice's text so far (it only grows): it
    answers how much of it is content that may be sent now. Once the choice finishes, parse its
    whole text with the parser (see the module docstring)."""

    def __init__(self, parser: ToolParser, content_from: int = 0) -> None:
        self.parser = parser
        self.start_at: int | None = None  # where the first start tag begins, once seen
        self._scanned = content_from  # the text before this was searched for the tag (or is
        # no content: a reasoning block)

    def content_end(self, text: str) -> int:
        if self.start_at is None:
            tag = self.parser.start
            found = text.find(tag, max(self._scanned - len(tag) + 1, 0))
            self._scanned = len(text)
            if found < 0:
                return len(text) - _partial_tag(text, tag)
            self.start_at = found
        return self.start_at
