"""Chat templates of a checkpoint folder, found and rendered as transformers does, so a
conversation becomes the same prompt text here as in ``tokenizer.apply_chat_template``.

Where the template comes from, first match wins: an explicit one (``--chat-template``, a file
or the Jinja text itself), ``chat_template.jinja`` beside the tokenizer (transformers writes it
there since 4.47 and reads it before the config), then ``chat_template`` in
tokenizer_config.json: a string, or a list of named templates of which "default" is used.

Rendering: a sandboxed Jinja environment with transformers' options (trim_blocks,
lstrip_blocks, the loopcontrols extension, lenient undefined names: Qwen3's template opens
with ``{% if tools %}``), its ``tojson`` (json.dumps, non-ASCII kept), ``raise_exception`` and
``strftime_now``; the variables it passes: ``messages``, ``tools`` (the OpenAI tool dicts,
``{"type": "function", "function": {name, description, parameters}}``, or None), ``documents``
(None), ``add_generation_prompt``, the special tokens, and the caller's keyword arguments (the
chat request's ``chat_template_kwargs``, e.g. Qwen3's ``enable_thinking``).
``continue_final_message`` ends the text where the final message's content ends, as
transformers cuts it, so the model continues that message (a prefilled answer).
"""

from __future__ import annotations

import json
import os
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.sandbox

from moebius.config import ConfigError

TEMPLATE_FILE = "chat_template.jinja"
# Names the renderer sets itself; a request's chat_template_kwargs may not replace them.
RESERVED = frozenset({"messages", "add_generation_prompt", "tools", "documents"})
# Appended to the final message's content for continue_final_message (transformers' marker):
# the rendered prompt is cut where it lands.
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def find_template(model_dir: str, config: dict, explicit: str | None = None) -> str | None:
    """The template text for a checkpoint (see the module docstring for the order)."""
    if explicit:
        if os.path.isfile(explicit):
            with open(explicit, encoding="utf-8") as f:
                return f.read()
        if "{" not in explicit:  # neither a file nor Jinja: a mistyped path
            raise ConfigError(f"chat template {explicit!r} is not a file")
        return explicit
    path = os.path.join(model_dir, TEMPLATE_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    found = config.get("chat_template")
    if isinstance(found, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in found if isinstance(t, dict)}
        found = named.get("default")
    return found if isinstance(found, str) and found else None


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message: str):
    raise ValueError(f"chat template: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_template(text: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(text)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"chat template does not parse: {e}") from e


def render(template: jinja2.Template, messages: list[dict], add_generation_prompt: bool,
           special_tokens: dict[str, str], variables: dict,
           tools: list[dict] | None = None, continue_final_message: bool = False) -> str:
    if continue_final_message and add_generation_prompt:  # vLLM's and transformers' 400
        raise ValueError(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
        )
    clash = RESERVED & variables.keys()
    if clash:
        raise ValueError(f"chat_template_kwargs may not set {sorted(clash)}")
    if not all(isinstance(k, str) and k.isidentifier() for k in variables):
        raise ValueError("chat_template_kwargs' keys must be identifiers")
    variables = {**special_tokens, **variables}
    if continue_final_message:
        messages = [*messages[:-1], _tag_final_message(messages[-1])]
    try:
        text = template.render(messages=messages, tools=tools, documents=None,
                               add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as e:  # e.g. a message shape the template does not handle
        raise ValueError(f"chat template: {e}") from e
    return _cut_at_tag(text, messages[-1]["content"]) if continue_final_message else text


def _tag_final_message(message: dict) -> dict:
    content = message.get("content") or ""
    if not isinstance(content, str):
        raise ValueError("continue_final_message: the final message's content must be text")
    return {**message, "content": content + CONTINUE_TAG}


def _cut_at_tag(text: str, tagged: str) -> str:
    """The prompt up to where the final message's content ends, found by the tag rendered
    after it (transformers' way, so a template that reshapes content still cuts right):
    content's trailing whitespace stays if the template kept the tag's space, else it goes."""
    at = text.rfind(CONTINUE_TAG.strip())
    if at < 0 or tagged.removesuffix(CONTINUE_TAG).strip() not in text:
        raise ValueError(
            "continue_final_message: the final message does not appear in the rendered chat "
            "template (the template dropped or rewrote it)"
        )
    return text[:at] if text.startswith(CONTINUE_TAG, at) else text[:at].rstrip()
