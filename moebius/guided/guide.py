"""Which tokens may come next for a guided request: a packed mask a step.

A ``Vocabulary`` holds, once per engine, the bytes of every token id (token_bytes.py), the ids
grouped by first byte, and the masks already computed for a JSON state (json_grammar.py
states are values, so one dict serves every request). A request's ``Guide`` follows its
outputs: before each sampling step the scheduler asks ``mask(outputs)``, the outputs it has
not read yet move the state, and the answer is the state's mask, V bits little-endian
(``numpy.packbits``), that the sampling rank applies to the logits (sampler.apply_token_masks).

A mask is computed once per state: inside a string every token without a quote, a backslash
or a control byte is allowed whatever the state (one precomputed mask), and only the rest
(a few percent of a vocabulary) is tried byte by byte; elsewhere only tokens whose first byte
can follow are tried, by prefix over the sorted tokens (a refused prefix prunes every token
under it). The end of sequence is allowed exactly
where the text is a whole document (a choice: one of the choices). A request whose outputs
leave the grammar gets only the end of sequence (it takes allowed_token_ids that share no
token with the mask: every logit -inf, and the draw falls outside).

Guided requests are never scheduled with a token in flight (engine/scheduler.py): the mask of
a step needs the token before it, so under overlapped steps they take every other step.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from moebius.guided import json_grammar as jg

CACHE_STATES = 1024  # JSON states whose masks are kept (19 KB each at 151,936 tokens)
_STRING_BREAKERS = frozenset(range(0x20)) | {0x22, 0x5C}


class Vocabulary:
    """Token bytes of one tokenizer at the model's vocabulary size, and the JSON masks."""

    def __init__(self, tokens: Sequence[bytes | None], eos_ids: Sequence[int]) -> None:
        self.tokens = list(tokens)
        self.size = len(self.tokens)
        self.eos_ids = [i for i in eos_ids if 0 <= i < self.size]
        first: dict[int, list[int]] = {}
        self.in_string = np.zeros(self.size, dtype=bool)  # fine inside any string
        self.string_breakers: list[int] = []  # the rest of the non-empty tokens
        for i, b in enumerate(self.tokens):
            if not b:
                continue
            first.setdefault(b[0], []).append(i)
            if _STRING_BREAKERS.isdisjoint(b):
                self.in_string[i] = True
            else:
                self.string_breakers.append(i)
        self.by_first = {k: np.array(v) for k, v in first.items()}
        # the non-empty tokens sorted by their bytes: a trie read by bisection (a prefix's
        # tokens are one run, the prefix itself first)
        order = sorted((b, i) for i, b in enumerate(self.tokens) if b)
        self._sorted = [b for b, _ in order]
        self._sorted_ids = [i for _, i in order]
        self._json: OrderedDict = OrderedDict()

    def _walk(self, state: jg.State, allowed: np.ndarray) -> None:
        """Set ``allowed`` for every token whose bytes the automaton takes from ``state``:
        depth first over the sorted tokens' shared prefixes, a prefix the automaton refuses
        pruned with all the tokens under it (at most states, after a few bytes)."""
        toks, ids = self._sorted, self._sorted_ids
        stack = [(0, len(toks), 0, state)]  # a run of tokens sharing ``depth`` bytes
        while stack:
            lo, hi, depth, st = stack.pop()
            while lo < hi and len(toks[lo]) == depth:  # the prefix itself is a token
                allowed[ids[lo]] = True
                lo += 1
            while lo < hi:
                byte = toks[lo][depth]
                end = hi if byte == 255 else bisect_left(
                    toks, toks[lo][:depth] + bytes([byte + 1]), lo, hi)
                nxt = jg.step(st, byte)
                if nxt is not None:
                    stack.append((lo, end, depth + 1, nxt))
                lo = end

    def pack(self, allowed: np.ndarray) -> bytes:
        return np.packbits(allowed, bitorder="little").tobytes()

    def json_mask(self, state: jg.State | None) -> bytes:
        """The packed mask of a JSON state (None: only the end of sequence)."""
        hit = self._json.get(state)
        if hit is not None:
            self._json.move_to_end(state)
            return hit
        allowed = self._json_allowed(state)
        self._json[state] = packed = self.pack(allowed)
        if len(self._json) > CACHE_STATES:
            self._json.popitem(last=False)
        return packed

    def _json_allowed(self, state: jg.State | None) -> np.ndarray:
        if state is None:
            allowed = np.zeros(self.size, dtype=bool)
        elif state[1] in (jg.VAL_STR, jg.KEY_STR):
            allowed = self.in_string.copy()
            for i in self.string_breakers:
                allowed[i] = jg.advance(state, self.tokens[i]) is not None
        else:
            allowed = np.zeros(self.size, dtype=bool)
            self._walk(state, allowed)
        if state is None or jg.complete(state):
            allowed[self.eos_ids] = True
        return allowed

    def choice_allowed(self, rests: Sequence[bytes], complete: bool) -> np.ndarray:
        """Tokens that are a prefix of one of ``rests`` (what the choices still hold after the
        text so far); the end of sequence where the text is a whole choice."""
        allowed = np.zeros(self.size, dtype=bool)
        for rest in rests:
            for i in self.by_first.get(rest[0], ()) if rest else ():
                allowed[i] = allowed[i] or rest.startswith(self.tokens[i])
        if complete or not allowed.any():
            allowed[self.eos_ids] = True
        return allowed


class Guide:
    """One request's place in its grammar: ``mask(outputs)`` before each sampled token."""

    def __init__(self, vocab: Vocabulary, kind: str, choices: Sequence[str] = ()) -> None:
        self.vocab, self.kind = vocab, kind
        self.read = 0  # outputs moved through so far
        self.state: jg.State | None = jg.OBJECT if kind == "json" else jg.VALUE_START
        self.text = b""  # choice: the bytes so far
        self.choices = [c.encode() for c in choices]
        self._choice_masks: dict[bytes, bytes] = {}

    def mask(self, outputs: Sequence[int]) -> bytes:
        for t in outputs[self.read:]:
            data = self.vocab.tokens[t] if 0 <= t < self.vocab.size else None
            if self.kind == "choice":
                ok = data is not None and self.text is not None
                self.text = self.text + data if ok else None
            else:
                self.state = jg.advance(self.state, data) if data is not None else None
        self.read = len(outputs)
        if self.kind != "choice":
            return self.vocab.json_mask(self.state)
        return self._choice_mask()

    def _choice_mask(self) -> bytes:
        hit = self._choice_masks.get(self.text)
        if hit is None:
            text = self.text
            rests = [] if text is None else [c[len(text):] for c in self.choices
                                             if c.startswith(text)]
            allowed = self.vocab.choice_allowed(rests, text in self.choices)
            hit = self._choice_masks[text] = self.vocab.pack(allowed)
        return hit
