"""Tokenizer of a checkpoint folder: tokenizer.json through `tokenizers`, its chat template
(moebius/chat_template.py), and incremental detokenization for streaming.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from tokenizers import Tokenizer as HFTokenizer

from moebius.chat_template import compile_template, find_template, render
from moebius.config import ConfigError


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Encode, decode and render chat templates for one checkpoint folder."""

    def __init__(self, model_dir: str, chat_template: str | None = None) -> None:
        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise ConfigError(f"{model_dir!r} has no tokenizer.json")
        try:
            self._tok = HFTokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on a corrupt file
            raise ConfigError(f"{path} could not be read: {e}") from e
        cfg_path = os.path.join(model_dir, "tokenizer_config.json")
        cfg: dict = {}
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                cfg = json.load(f)
        self.chat_template = find_template(model_dir, cfg, chat_template)
        self.special_tokens = {  # as transformers hands them to the template
            name: text
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (text := _token_text(cfg.get(name))) is not None
        }
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.add_bos = bool(cfg.get("add_bos_token", False))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self._template = compile_template(self.chat_template) if self.chat_template else None

    @property
    def hf(self) -> HFTokenizer:
        """The underlying ``tokenizers`` object (guided decoding reads its vocabulary)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        """The vocabulary's strings for ``ids`` (byte-level BPE writes a space as "Ġ"), as
        transformers' method of that name; every id must be below ``vocab_size``."""
        return [self._tok.id_to_token(i) for i in ids]

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict | None = None,
        tools: list[dict] | None = None,
        continue_final_message: bool = False,
    ) -> str:
        """The prompt text of a conversation; ``chat_template_kwargs`` become template
        variables, ``tools`` (OpenAI's tool dicts) the template's ``tools``;
        ``continue_final_message`` ends the text inside the final message (ValueError with
        ``add_generation_prompt``). Encode it with ``add_special_tokens=False``: templates
        write their BOS."""
        if self._template is None:
            raise ConfigError(
                "this checkpoint has no chat template (chat_template.jinja or tokenizer_config."
                "json's chat_template); give one with --chat-template"
            )
        return render(self._template, messages, add_generation_prompt, self.special_tokens,
                      chat_template_kwargs or {}, tools, continue_final_message)


@dataclass
class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-decoding everything.

    Holds back text that ends in an incomplete UTF-8 sequence (decoded as U+FFFD) until the
    next token completes it.
    """

    tokenizer: Tokenizer
    skip_special_tokens: bool = True
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""
    seen: int = 0  # tokens stepped over (read_offset lags while text is held back)

    def step(self, ids: list[int], upto: int | None = None) -> str:
        """The text delta once ``ids[:upto]`` (default: all) are known."""
        n = len(ids) if upto is None else upto
        prefix = self.tokenizer.decode(
            ids[self.prefix_offset : self.read_offset], self.skip_special_tokens
        )
        full = self.tokenizer.decode(ids[self.prefix_offset : n], self.skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = n
            self.text += delta
            return delta
        return ""

    def catch_up(self, ids: list[int]) -> None:
        """Step once per token not seen yet, as a stream would have: the text is the same
        whether it was followed token by token or read once at the end."""
        seen = max(self.read_offset, self.seen)
        for n in range(seen + 1, len(ids) + 1):
            self.step(ids, n)
        self.seen = len(ids)
