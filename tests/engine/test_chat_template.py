"""Chat templates render as transformers renders them (its AutoTokenizer on the same folder is
the reference): where the template is found, the Jinja environment (lenient undefined names,
loop controls, tojson, namespace), template variables from the caller, and one BOS when the
template writes it and the tokenizer also adds one."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from moebius import LLM, SamplingParams
from moebius.config import ConfigError
from moebius.tokenizer import Tokenizer

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


def _folder(src: str, dst: str, template_file: str | None = None, **config) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(config)
    with open(path, "w") as f:
        json.dump(cfg, f)
    if template_file is not None:
        with open(os.path.join(dst, "chat_template.jinja"), "w") as f:
            f.write(template_file)
    return dst


@pytest.fixture(scope="module")
def rich_dir(qwen_dir, tmp_path_factory):
    # chat_template.jinja must win over tokenizer_config.json's (the tiny ChatML one)
    return _folder(qwen_dir, str(tmp_path_factory.mktemp("rich") / "ckpt"), RICH)


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
    listed = _folder(qwen_dir, str(tmp_path / "listed"), chat_template=[
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
    bare = _folder(qwen_dir, str(tmp_path / "bare"), chat_template=None)
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

    folder = _folder(qwen_dir, str(tmp_path / "bos"), RICH, bos_token="<|endoftext|>",
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
