"""A chat output's reasoning: ``--reasoning-parser qwen3|deepseek_r1``, as vLLM's, puts the
text between ``<think>`` and ``</think>`` in ``message.reasoning_content`` (streamed as
``delta.reasoning_content``) and the rest in ``content``, where tool calls are then read.

- ``qwen3``: reasoning only when the output begins with ``<think>`` (Qwen3 writes the tag
  itself; with ``enable_thinking: false`` the template closes an empty block in the prompt and
  the output is all content). Cut off before ``</think>``: all of it is reasoning.
- ``deepseek_r1``: the template opens the block in the prompt, so the output begins inside
  it (a ``<think>`` it writes anyway is dropped); everything before ``</think>`` is
  reasoning, all of it when the tag never comes. Use it too for templates that open the
  block themselves (Qwen3's thinking-only 2507 models).

A stream sends the same split as the whole response: the reasoning as it comes, holding
back a tail that could still grow into ``</think>`` (or, for qwen3, into ``<think>`` at the
start), then the content.
"""

from __future__ import annotations

from dataclasses import dataclass

from moebius.server.tool_parsers import _partial_tag as _partial

START, END = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningParser:
    name: str
    opens_in_prompt: bool  # deepseek_r1: the output begins inside the block

    def split_at(self, text: str, done: bool) -> tuple[int, int, int | None]:
        """Where the reasoning of ``text`` (the output so far) begins and ends, and where
        the content begins (None: not yet known). Unless ``done``, ends that may still grow
        into a tag are held back: (r0, r1) covers what may be sent as reasoning now."""
        if text.startswith(START):
            r0 = len(START)
        elif not done and START.startswith(text):
            return 0, 0, None  # may still become "<think>"
        elif self.opens_in_prompt:
            r0 = 0
        else:
            return 0, 0, 0  # no reasoning: all content
        end = text.find(END, r0)
        if end >= 0:
            return r0, end, end + len(END)
        if done:
            return r0, len(text), len(text)
        return r0, max(len(text) - _partial(text, END), r0), None

    def split(self, text: str) -> tuple[str | None, str]:
        """(reasoning or None, content) of a finished output."""
        r0, r1, c0 = self.split_at(text, done=True)
        return (text[r0:r1] if c0 else None), text[c0:]


PARSERS = {"qwen3": ReasoningParser("qwen3", False),
           "deepseek_r1": ReasoningParser("deepseek_r1", True)}


def make(name: str | None) -> ReasoningParser | None:
    if name is None:
        return None
    if name not in PARSERS:
        raise ValueError(f"unknown --reasoning-parser {name!r}; known: {', '.join(PARSERS)}")
    return PARSERS[name]
