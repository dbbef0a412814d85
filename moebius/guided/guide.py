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

import json
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from moebius.guided import json_grammar as jg
from moebius.guided.json_schema import Schema

CACHE_STATES = 1024  # states whose masks are kept (19 KB each at 151,936 tokens)
CACHE_SCHEMAS = 64  # compiled schemas kept, each with its states' masks
_STRING_BREAKERS = frozenset(range(0x20)) | {0x22, 0x5C}


class JsonObject:
    """json_grammar.py's automaton from the start of one object (JSON mode)."""

    start = jg.OBJECT
    step = staticmethod(jg.step)
    complete = staticmethod(jg.complete)

    @staticmethod
    def in_plain_string(state) -> bool:
        return state is not None and state[1] in (jg.VAL_STR, jg.KEY_STR)


JSON_OBJECT = JsonObject()


class Vocabulary:
    """Token bytes of one tokenizer at the model's vocabulary size, the compiled schemas,
    and each automaton's masks by state."""

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
        self._masks: dict[object, OrderedDict] = {JSON_OBJECT: OrderedDict()}
        self._schemas: OrderedDict = OrderedDict()

    def schema(self, schema) -> Schema:
        """``schema`` compiled (once per distinct schema; SchemaError where unsupported)."""
        key = json.dumps(schema, sort_keys=True)
        hit = self._schemas.get(key)
        if hit is None:
            hit = self._schemas[key] = Schema(schema)
            self._masks[hit] = OrderedDict()
            if len(self._schemas) > CACHE_SCHEMAS:
                self._masks.pop(self._schemas.popitem(last=False)[1], None)
        else:
            self._schemas.move_to_end(key)
        return hit

    def _walk(self, step, state, allowed: np.ndarray) -> None:
        """Set ``allowed`` for every token whose bytes ``step`` takes from ``state``:
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
                nxt = step(st, byte)
                if nxt is not None:
                    stack.append((lo, end, depth + 1, nxt))
                lo = end

    def pack(self, allowed: np.ndarray) -> bytes:
        return np.packbits(allowed, bitorder="little").tobytes()

    def mask(self, automaton, state) -> bytes:
        """The packed mask of ``automaton`` (JSON_OBJECT, a Schema) in ``state`` (None: only
        the end of sequence)."""
        cache = self._masks.get(automaton)
        if cache is None:  # a schema pushed out of the cache while a request still uses it
            cache = self._masks[automaton] = OrderedDict()
        hit = cache.get(state)
        if hit is not None:
            cache.move_to_end(state)
            return hit
        cache[state] = packed = self.pack(self._allowed(automaton, state))
        if len(cache) > CACHE_STATES:
            cache.popitem(last=False)
        return packed

    def json_mask(self, state: jg.State | None) -> bytes:
        """The packed mask of a JSON-mode state."""
        return self.mask(JSON_OBJECT, state)

    def _allowed(self, automaton, state) -> np.ndarray:
        step = automaton.step
        if state is None:
            allowed = np.zeros(self.size, dtype=bool)
        elif automaton.in_plain_string(state):
            allowed = self.in_string.copy()
            for i in self.string_breakers:
                allowed[i] = _advance(step, state, self.tokens[i]) is not None
        else:
            allowed = np.zeros(self.size, dtype=bool)
            self._walk(step, state, allowed)
        if state is None or automaton.complete(state):
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


def _advance(step, state, data: bytes):
    for b in data:
        state = step(state, b)
        if state is None:
            return None
    return state


class Guide:
    """One request's place in its grammar: ``mask(outputs)`` before each sampled token.
    ``kind``: "json" (one object), "schema" (``spec`` a JSON schema) or "choice" (``spec``
    the strings)."""

    def __init__(self, vocab: Vocabulary, kind: str, spec=()) -> None:
        self.vocab, self.kind = vocab, kind
        self.read = 0  # outputs moved through so far
        self.automaton = (JSON_OBJECT if kind == "json" else vocab.schema(spec)
                          if kind == "schema" else None)
        self.state = self.automaton.start if self.automaton is not None else None
        self.text = b""  # choice: the bytes so far
        self.choices = [c.encode() for c in spec] if kind == "choice" else []
        self._choice_masks: dict[bytes, bytes] = {}

    def mask(self, outputs: Sequence[int]) -> bytes:
        for t in outputs[self.read:]:
            data = self.vocab.tokens[t] if 0 <= t < self.vocab.size else None
            if self.kind == "choice":
                ok = data is not None and self.text is not None
                self.text = self.text + data if ok else None
            elif self.state is not None:
                self.state = (_advance(self.automaton.step, self.state, data)
                              if data is not None else None)
        self.read = len(outputs)
        if self.kind != "choice":
            return self.vocab.mask(self.automaton, self.state)
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
