"""Which tokens may come next for a guided request: a packed mask a step.

Each kind of guide is a byte automaton with hashable states (``start``, ``step``,
``complete``, ``in_plain_string``): JSON mode (json_grammar.py), a JSON schema
(json_schema.py), a choice among strings (``Choices``), a regular expression (regex.py). A
``Vocabulary`` holds, once per engine, the bytes of every token id (token_bytes.py) and the
``Grammar``s in use: an automaton with the masks already computed for its states (states are
values, so one dict serves every request with that grammar). A request's ``Guide`` follows
its outputs: before each sampling step the scheduler asks ``mask(outputs)``, the outputs it
has not read yet move the state, and the answer is the state's mask, V bits little-endian
(``numpy.packbits``), that the sampling rank applies to the logits
(sampler.apply_token_masks). A regex's masks come from a ``ByteTable`` instead of the walk.

A mask is computed once per state: inside a string every token without a quote, a backslash
or a control byte is allowed whatever the state (one precomputed mask), and only the rest
(a few percent of a vocabulary) is tried byte by byte; elsewhere only tokens whose first byte
can follow are tried, by prefix over the sorted tokens (a refused prefix prunes every token
under it). The end of sequence is allowed exactly where the text is whole (a document, one of
the choices). A request whose outputs leave the grammar gets only the end of sequence (it
takes allowed_token_ids that share no token with the mask: every logit -inf, and the draw
falls outside).

Under overlapped steps the mask of a step needs the token still in flight at its launch: the
scheduler marks the row ``LATE_MASK`` and the engine sends the mask once that token lands,
before the ranks sample (engine/scheduler.py ``late_masks``, ModelRunner.sample_late).
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from moebius.guided import json_grammar as jg
from moebius.guided import regex
from moebius.guided.json_schema import compiled

CACHE_STATES = 1024  # states whose masks a grammar keeps (19 KB each at 151,936 tokens)
CACHE_GRAMMARS = 64  # grammars a vocabulary keeps (distinct schemas and choice lists)
WHITESPACE_RUN = 32  # bytes of whitespace a JSON output may write between two tokens
_STRING_BREAKERS = frozenset(range(0x20)) | {0x22, 0x5C}


class JsonObject:
    """json_grammar.py's automaton from the start of one object (JSON mode)."""

    start = jg.OBJECT
    step = staticmethod(jg.step)
    complete = staticmethod(jg.complete)

    @staticmethod
    def in_plain_string(state) -> bool:
        return state is not None and state[1] in (jg.VAL_STR, jg.KEY_STR)

    between_tokens = staticmethod(jg.between_tokens)


class Choices:
    """Exactly one of some strings (any tokenization of it): a state is the bytes so far. A
    step finds the choices that begin so by bisection in the sorted choices (trying each
    took 1 s a new state's mask at 1,000 choices)."""

    start = b""

    def __init__(self, choices: Sequence[str]) -> None:
        self.choices = frozenset(c.encode() for c in choices)
        self._sorted = sorted(self.choices)

    def step(self, state: bytes, b: int) -> bytes | None:
        nxt = state + bytes((b,))
        i = bisect_left(self._sorted, nxt)
        return nxt if i < len(self._sorted) and self._sorted[i].startswith(nxt) else None

    def complete(self, state) -> bool:
        return state in self.choices

    def in_plain_string(self, state) -> bool:
        return False


class BoundedWhitespace:
    """A JSON automaton whose whitespace between tokens comes in runs of at most ``limit``
    bytes (whitespace inside strings, keys, patterns and enum values is text and does not
    count). JSON allows any amount, and a model that likes newlines can spend every token on
    them (vLLM's "disable any whitespace" and SGLang's whitespace pattern exist for that); a
    bounded run still takes indentation (32 bytes: a newline and 31 spaces) but makes the
    model write the next token. A state is (the inner automaton's state, the length of the
    current run)."""

    def __init__(self, inner, limit: int = WHITESPACE_RUN) -> None:
        self.inner, self.limit = inner, limit
        self.start = (inner.start, 0)

    def step(self, state, b: int):
        inner, run = state
        nxt = self.inner.step(inner, b)
        if nxt is None:
            return None
        if b in jg.WS and self.inner.between_tokens(inner):
            return (nxt, run + 1) if run < self.limit else None
        return (nxt, 0)

    def complete(self, state) -> bool:
        return state is not None and self.inner.complete(state[0])

    def in_plain_string(self, state) -> bool:
        return state is not None and self.inner.in_plain_string(state[0])


class ByteTable:
    """An automaton's moves as a table, filled as states are met: row ``id`` holds, for each
    byte, the id of the state it leads to (0: none, ``DEAD``), or -1 where not yet known. A
    regex's masks come from it: every token's bytes advance together, a numpy gather a byte
    position (``Vocabulary._table_walk``), where stepping token by token cost 0.6 s a new
    state for ``[A-Za-z ]{1,40}`` (most of a vocabulary is letters, so the walk prunes
    little)."""

    DEAD = 0

    def __init__(self, automaton) -> None:
        self.automaton = automaton
        self.states: list = [None]  # id -> state (0: dead)
        self.ids: dict = {}
        self.next = np.full((64, 256), -1, dtype=np.int32)
        self.next[0] = 0  # dead stays dead

    def id(self, state) -> int:
        got = self.ids.get(state)
        if got is None:
            got = self.ids[state] = len(self.states)
            self.states.append(state)
            if got >= len(self.next):
                grown = np.full((2 * len(self.next), 256), -1, dtype=np.int32)
                grown[: len(self.next)] = self.next
                self.next = grown
        return got

    def fill(self, ids: np.ndarray, data: np.ndarray) -> None:
        """Compute the moves (``ids[k]``, ``data[k]``) not known yet: only the pairs the
        tokens ask for (a multi-byte character's partial states are many, their used moves
        few)."""
        unknown = self.next[ids, data] < 0
        if not unknown.any():
            return
        step = self.automaton.step
        keys = np.unique(ids[unknown].astype(np.int64) * 256 + data[unknown])
        for key in keys.tolist():
            i, b = divmod(key, 256)
            nxt = step(self.states[i], b)
            self.next[i, b] = 0 if nxt is None else self.id(nxt)


@dataclass
class Grammar:
    """An automaton, and the packed masks of its states computed so far for one vocabulary
    (and, for a regex, its ``ByteTable``)."""

    automaton: BoundedWhitespace | Choices | regex.Regex
    masks: OrderedDict = field(default_factory=OrderedDict)
    table: ByteTable | None = None


class Vocabulary:
    """Token bytes of one tokenizer at the model's vocabulary size, the compiled schemas,
    and each automaton's masks by state."""

    def __init__(self, tokens: Sequence[bytes | None], eos_ids: Sequence[int]) -> None:
        self.tokens = list(tokens)
        self.size = len(self.tokens)
        self.eos_ids = [i for i in eos_ids if 0 <= i < self.size]
        self.in_string = np.zeros(self.size, dtype=bool)  # fine inside any string
        self.string_breakers: list[int] = []  # the rest of the non-empty tokens
        for i, b in enumerate(self.tokens):
            if not b:
                continue
            if _STRING_BREAKERS.isdisjoint(b):
                self.in_string[i] = True
            else:
                self.string_breakers.append(i)
        # the non-empty tokens sorted by their bytes: a trie read by bisection (a prefix's
        # tokens are one run, the prefix itself first)
        order = sorted((b, i) for i, b in enumerate(self.tokens) if b)
        self._sorted = [b for b, _ in order]
        self._sorted_ids = [i for _, i in order]
        self._matrix: tuple[np.ndarray, np.ndarray] | None = None  # (bytes, lengths)
        self._grammars: OrderedDict = OrderedDict()

    def grammar(self, kind: str, spec=(), whitespace: int = WHITESPACE_RUN) -> Grammar:
        """The grammar of ``kind`` ("json", "schema" with ``spec`` a JSON schema, "choice"
        with ``spec`` the strings, "regex" with ``spec`` the pattern; JSON's whitespace runs
        between tokens at most ``whitespace`` bytes), built once per distinct spec
        (SchemaError or RegexError where unsupported); a request holds on to its own past
        this cache's bound."""
        if kind not in ("json", "schema"):
            whitespace = 0  # (not read)
        # in the spec's order: a schema's properties follow it
        key = (kind, json.dumps(spec), whitespace)
        hit = self._grammars.get(key)
        if hit is None:
            automaton = (BoundedWhitespace(JsonObject(), whitespace) if kind == "json"
                         else BoundedWhitespace(compiled(spec), whitespace) if kind == "schema"
                         else regex.compiled(spec) if kind == "regex"
                         else Choices(spec))
            table = ByteTable(automaton) if kind == "regex" else None
            hit = self._grammars[key] = Grammar(automaton, table=table)
            if len(self._grammars) > CACHE_GRAMMARS:
                self._grammars.popitem(last=False)
        else:
            self._grammars.move_to_end(key)
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

    def mask(self, grammar: Grammar, state) -> bytes:
        """The packed mask of ``grammar`` in ``state`` (None: only the end of sequence)."""
        cache = grammar.masks
        hit = cache.get(state)
        if hit is not None:
            cache.move_to_end(state)
            return hit
        if grammar.table is not None and state is not None:
            allowed = self._table_walk(grammar.table, state)
        else:
            allowed = self._allowed(grammar.automaton, state)
        cache[state] = packed = self.pack(allowed)
        if len(cache) > CACHE_STATES:
            cache.popitem(last=False)
        return packed

    def _byte_matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """Every token's bytes as rows of one zero-padded uint8 matrix, and their lengths
        (0 for a token without bytes); built at the first regex mask."""
        if self._matrix is None:
            lens = np.array([len(b) if b else 0 for b in self.tokens], dtype=np.int64)
            mat = np.zeros((self.size, max(int(lens.max()), 1)), dtype=np.uint8)
            for i, b in enumerate(self.tokens):
                if b:
                    mat[i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
            self._matrix = (mat, lens)
        return self._matrix

    def _table_walk(self, table: ByteTable, state) -> np.ndarray:
        """The tokens whose bytes ``table``'s automaton takes from ``state``: all tokens
        advance together one byte position at a time, those refused dropping out; the end
        of sequence where ``state`` is whole."""
        mat, lens = self._byte_matrix()
        allowed = np.zeros(self.size, dtype=bool)
        rows = np.flatnonzero(lens > 0)
        cur = np.full(rows.size, table.id(state), dtype=np.int32)
        for pos in range(mat.shape[1]):
            ended = lens[rows] <= pos
            allowed[rows[ended]] = True
            rows, cur = rows[~ended], cur[~ended]
            if not rows.size:
                break
            data = mat[rows, pos]
            table.fill(cur, data)
            cur = table.next[cur, data]
            live = cur != ByteTable.DEAD
            rows, cur = rows[live], cur[live]
        allowed[rows] = True  # the longest tokens, whole
        if table.automaton.complete(state):
            allowed[self.eos_ids] = True
        return allowed

    def _allowed(self, automaton, state) -> np.ndarray:
        step = automaton.step
        if state is None:
            allowed = np.zeros(self.size, dtype=bool)
        elif automaton.in_plain_string(state):
            allowed = self.in_string.copy()
            for i in self.string_breakers:
                allowed[i] = jg.advance(state, self.tokens[i], step) is not None
        else:
            allowed = np.zeros(self.size, dtype=bool)
            self._walk(step, state, allowed)
        if state is None or automaton.complete(state):
            allowed[self.eos_ids] = True
        return allowed


class Guide:
    """One request's place in its grammar: ``mask(outputs)`` before each sampled token.
    ``kind`` and ``spec``: as ``Vocabulary.grammar``."""

    def __init__(self, vocab: Vocabulary, kind: str, spec=(), whitespace=WHITESPACE_RUN) -> None:
        self.vocab = vocab
        self.grammar = vocab.grammar(kind, spec, whitespace)
        self.state = self.grammar.automaton.start
        self.read = 0  # outputs moved through so far

    def mask(self, outputs: Sequence[int]) -> bytes:
        step = self.grammar.automaton.step
        for t in outputs[self.read:]:
            data = self.vocab.tokens[t] if 0 <= t < self.vocab.size else None
            self.state = jg.advance(self.state, data, step) if data is not None else None
        self.read = len(outputs)
        return self.vocab.mask(self.grammar, self.state)
