"""Chat templates render as transformers renders them (its AutoTokenizer on the same folder is
the reference): where the template is found, the Jinja environment (lenient undefined names,
loop controls, tojson, namespace), template variables from the caller, tools and tool-call
messages as a chat request sends them, and one BOS when the template writes it and the
tokenizer also adds one."""

from __future__ import annotations

import json

import pytest

from moebius import LLM, SamplingParams
from moebius.config import ConfigError
from moebius.server.protocol import ChatCompletionRequest
from moebius.tokenizer import Tokenizer
from tests.conftest import TOOLS_TEMPLATE, copy_checkpoint

# Exercises what real templates use (Qwen3's opens with `{% if tools %}`; our own text).
RICH = """{{- bos_token if bos_token else '' -}}
{%- if tools %}{{ 'tools: ' + (tools | tojson) + '\\n' }}{% endif -%}
{%- set ns = namespace(system='') -%}
{%- for m in messages -%}
  {%- if m.role == 'system' %}{% set ns.system = m.content %}{% continue %}{% endif -%}
  {{- '<|im_start|>' + m.role + '\\n' + (ns.system + ' | ' if loop.index0 == 1 and ns.system
      else '') + m.content + '<|im_end|>\\n' -}}
  {%- if m.meta is defined %}{{ m.meta | tojson }}{% endif -%}
  {%- if m.content == 'STOP' %}{% break %}{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\\n' -}}
  {%- if enable_thinking is defined and not enable_thinking %}{{ '<think>\\n\\n</think>\\n\\n' }}
  {%- endif -%}
{%- endif -%}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Spain?"}],
    [{"role": "user", "content": "STOP"}, {"role": "user", "content": "never rendered"}],
    [{"role": "user", "content": "naïve — ünïcode", "meta": {"k": "é", "n": [1, 2]}}],
]


@pytest.fixture(scope="module")
def rich_dir(qwen_dir, tmp_path_factory):
    # chat_template.jinja must win over tokenizer_config.json's (the tiny ChatML one)
    return copy_checkpoint(qwen_dir, str(tmp_path_factory.mktemp("rich") / "ckpt"), RICH)


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}, {"enable_thinking": True}])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_renders_as_transformers(rich_dir, conv, kwargs):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(rich_dir)
    ours = Tokenizer(rich_dir)
    for gen in (True, False):
        want = ref.apply_chat_template(CONVERSATIONS[conv], tokenize=False,
                                       add_generation_prompt=gen, **kwargs)
        assert ours.apply_chat_template(CONVERSATIONS[conv], gen, kwargs) == want


def test_where_the_template_comes_from(qwen_dir, tmp_path):
    listed = copy_checkpoint(qwen_dir, str(tmp_path / "listed"), chat_template=[
        {"name": "tool_use", "template": "T{{ messages[0].content }}"},
        {"name": "default", "template": "D{{ messages[0].content }}"}])
    hello = [{"role": "user", "content": "hi"}]
    assert Tokenizer(listed).apply_chat_template(hello) == "Dhi"
    assert Tokenizer(listed, "X{{ messages[0].content }}").apply_chat_template(hello) == "Xhi"
    path = tmp_path / "mine.jinja"
    path.write_text("F{{ messages[0].content }}")
    assert Tokenizer(listed, str(path)).apply_chat_template(hello) == "Fhi"
    with pytest.raises(ConfigError, match="not a file"):
        Tokenizer(listed, str(tmp_path / "missing.jinja"))
    with pytest.raises(ConfigError, match="does not parse"):
        Tokenizer(listed, "{% for %}")
    bare = copy_checkpoint(qwen_dir, str(tmp_path / "bare"), chat_template=None)
    with pytest.raises(ConfigError, match="--chat-template"):
        Tokenizer(bare).apply_chat_template(hello)


def test_variables_the_renderer_owns_cannot_be_replaced(rich_dir):
    tok = Tokenizer(rich_dir)
    for bad in ({"messages": []}, {"add_generation_prompt": False}, {"tools": [{}]}):
        with pytest.raises(ValueError, match="may not set"):
            tok.apply_chat_template(CONVERSATIONS[0], True, bad)
    with pytest.raises(ValueError, match="identifiers"):
        tok.apply_chat_template(CONVERSATIONS[0], True, {"not a name": 1})


def test_a_template_that_writes_bos_gets_one_bos(qwen_dir, tmp_path):
    """Mixtral-style: add_bos_token and a template starting with {{ bos_token }}. The chat
    prompt must hold one BOS, as transformers' tokenized chat does, not two."""
    from transformers import AutoTokenizer

    folder = copy_checkpoint(qwen_dir, str(tmp_path / "bos"), RICH, bos_token="<|endoftext|>",
                     add_bos_token=True)
    conv = CONVERSATIONS[1]
    want = AutoTokenizer.from_pretrained(folder).apply_chat_template(
        conv, tokenize=True, add_generation_prompt=True, return_dict=False)
    with LLM(folder) as llm:
        bos = llm.tokenizer.bos_token_id
        out = llm.chat(conv, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
                       chat_template_kwargs={"enable_thinking": False})[0]
        plain = llm.chat(conv, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))[0]
    assert bos is not None and out.prompt_token_ids.count(bos) == 1
    assert plain.prompt_token_ids == list(want)
    assert out.prompt.endswith("<think>\n\n</think>\n\n") and out.prompt.startswith("<|endoftext|>")


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city, now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "clock"}}  # no description, no parameters


def _call(call_id, name, args):  # as a client sends it: arguments are JSON text
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)}}


# (messages as a chat request sends them, the same as transformers takes them: arguments as
# objects, as vLLM hands them over)
TOOL_CONVERSATIONS = [
    ([{"role": "user", "content": "Weather in Paris?"}],
     [{"role": "user", "content": "Weather in Paris?"}]),
    ([{"role": "system", "content": "Be brief."},
      {"role": "user", "content": "Weather in Paris and in Zürich, and the time?"},
      {"role": "assistant", "content": None, "tool_calls": [
          _call("call_1", "get_weather", {"city": "Paris"}),
          _call("call_2", "get_weather", {"city": "Zürich", "unit": "C"}),
          _call("call_3", "clock", {})]},
      {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21"},
      {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "rain"}]},
      {"role": "tool", "tool_call_id": "call_3", "content": "12:00"},
      {"role": "assistant", "content": "Sunny in Paris, rain in Zürich; it is noon."},
      {"role": "user", "content": "Thanks"}],
     [{"role": "system", "content": "Be brief."},
      {"role": "user", "content": "Weather in Paris and in Zürich, and the time?"},
      {"role": "assistant", "content": "", "tool_calls": [
          {"id": "call_1", "type": "function",
           "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
          {"id": "call_2", "type": "function",
           "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "C"}}},
          {"id": "call_3", "type": "function", "function": {"name": "clock", "arguments": {}}}]},
      {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21"},
      {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
      {"role": "tool", "tool_call_id": "call_3", "content": "12:00"},
      {"role": "assistant", "content": "Sunny in Paris, rain in Zürich; it is noon."},
      {"role": "user", "content": "Thanks"}]),
]


@pytest.fixture(scope="module")
def tools_dir(qwen_dir, tmp_path_factory):
    return copy_checkpoint(qwen_dir, str(tmp_path_factory.mktemp("tools") / "ckpt"), TOOLS_TEMPLATE)


@pytest.mark.parametrize("choice", [None, "auto", "required", "none"])
@pytest.mark.parametrize("conv", range(len(TOOL_CONVERSATIONS)))
def test_tools_render_as_transformers(tools_dir, conv, choice):
    """A chat request's tools and tool-call messages reach the template as transformers'
    apply_chat_template(tools=...) takes them; tool_choice "none" renders no tools."""
    from transformers import AutoTokenizer

    sent, reference = TOOL_CONVERSATIONS[conv]
    body = {"model": "m", "messages": sent, "tools": [WEATHER, CLOCK]}
    if choice is not None:
        body["tool_choice"] = choice
    req = ChatCompletionRequest.model_validate_json(json.dumps(body))
    ours = Tokenizer(tools_dir).apply_chat_template(req.rendered_messages(), True, None,
                                                    req.template_tools())
    tools = None if choice == "none" else [WEATHER, CLOCK]
    want = AutoTokenizer.from_pretrained(tools_dir).apply_chat_template(
        reference, tools=tools, tokenize=False, add_generation_prompt=True)
    assert ours == want
    assert ("<tools>" in ours) == (choice != "none")
    if conv == 1:
        assert '"arguments": {"city": "Zürich", "unit": "C"}' in ours  # an object, not a string
        assert '<tool_response id="call_2">\nrain' in ours


def test_bad_tool_messages_name_the_field():
    def rendered(message):
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}, message]}
        return ChatCompletionRequest.model_validate_json(json.dumps(body)).rendered_messages()

    bad_json = {"role": "assistant", "tool_calls": [
        _call("c", "f", {}), {"id": "d", "type": "function",
                              "function": {"name": "f", "arguments": "{oops"}}]}
    with pytest.raises(ValueError, match=r"messages\[1\]\.tool_calls\[1\]\.function\.arguments"):
        rendered(bad_json)
    with pytest.raises(ValueError, match=r"messages\[1\]\.tool_calls: only assistant"):
        rendered({"role": "user", "content": "x", "tool_calls": [_call("c", "f", {})]})
