"""Shared fixtures: tiny random checkpoints written once per session, the transformers
reference generation, and a Qwen-style chat template with tool support."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from moebius.model.tiny import write_tiny_checkpoint

PROMPTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. A mixture of experts",
    "def add(a, b):",
    "What is the capital of France? Paris is the capital of France. Numbers: 0 1 2 3 4 5 6 7",
]

# Qwen2.5/Qwen3-style tool template (our own text, the same structure): tools as JSON lines in
# the system turn, assistant calls as <tool_call> JSON with `arguments | tojson`, consecutive
# tool results in one user turn. Unlike Qwen's it also writes tool_call_id, so a test sees it
# reach the template. Without tools it renders as the tiny checkpoint's ChatML template.
TOOLS_TEMPLATE = r"""
{%- if tools %}
  {{- '<|im_start|>system\n' }}
  {%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}
  {{- '# Tools\n\n<tools>' }}
  {%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}
  {{- '\n</tools>\n\nCall them as <tool_call>\n{"name": ..., "arguments": {...}}\n'
      '</tool_call><|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
  {%- if message.role == 'system' and loop.first and tools %}{% continue %}{% endif %}
  {%- if message.role == 'assistant' and message.tool_calls %}
    {{- '<|im_start|>assistant' }}
    {%- if message.content %}{{- '\n' + message.content }}{%- endif %}
    {%- for tool_call in message.tool_calls %}
      {%- set call = tool_call.function if tool_call.function is defined else tool_call %}
      {{- '\n<tool_call>\n{"name": "' + call.name + '", "arguments": ' }}
      {{- call.arguments | tojson }}
      {{- '}\n</tool_call>' }}
    {%- endfor %}
    {{- '<|im_end|>\n' }}
  {%- elif message.role == 'tool' %}
    {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
      {{- '<|im_start|>user' }}
    {%- endif %}
    {{- '\n<tool_response id="' + (message.tool_call_id or '') + '">\n' + message.content }}
    {{- '\n</tool_response>' }}
    {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
  {%- else %}
    {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
  {{- '<|im_start|>assistant\n' }}
  {%- if enable_thinking is defined and enable_thinking is false %}
    {{- '<think>\n\n</think>\n\n' }}
  {%- endif %}
{%- endif %}
"""


@pytest.fixture(scope="session")
def tools_template_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("templates") / "tools.jinja"
    path.write_text(TOOLS_TEMPLATE)
    return str(path)


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("qwen")), "qwen3_moe", seed=1)


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory):
    return write_tiny_checkpoint(
        str(tmp_path_factory.mktemp("mixtral")), "mixtral", seed=2, num_shards=3
    )


@pytest.fixture(scope="session")
def qwen_fused_dir(tmp_path_factory):
    return write_tiny_checkpoint(
        str(tmp_path_factory.mktemp("qwenfused")),
        "qwen3_moe",
        seed=1,
        fused_experts=True,
        num_shards=2,
    )


@pytest.fixture(scope="session")
def qwen_b_dir(tmp_path_factory):
    """The same model as ``qwen_dir`` with other weights, its experts stored fused (weight
    updates)."""
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("qwen_b")), "qwen3_moe", seed=7,
                                 fused_experts=True)


def copy_checkpoint(src: str, dst: str, template: str | None = None, **config) -> str:
    """A copy of checkpoint folder ``src`` at ``dst`` with ``config`` merged into its
    tokenizer_config.json and, given, ``template`` as its chat_template.jinja."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(config)
    with open(path, "w") as f:
        json.dump(cfg, f)
    if template is not None:
        with open(os.path.join(dst, "chat_template.jinja"), "w") as f:
            f.write(template)
    return dst


def hf_greedy(model_dir: str, prompt_ids: list[list[int]], max_new_tokens: int,
              per_prompt: list[dict] | None = None):
    """Greedy tokens from transformers' own model class, one prompt at a time (no padding);
    ``per_prompt``: more ``generate`` arguments for each prompt (logits processors, its
    repetition penalty)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    outs = []
    for i, ids in enumerate(prompt_ids):
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(
                x,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                min_new_tokens=max_new_tokens,
                **(per_prompt[i] if per_prompt else {}),
            )
        outs.append(y[0, len(ids) :].tolist())
    return outs, model


def token_ids(outs) -> list[list[int]]:
    """Each request's first completion's tokens, from ``LLM.generate``'s outputs."""
    return [o.outputs[0].token_ids for o in outs]


def cuda_available() -> bool:
    return torch.cuda.is_available()
