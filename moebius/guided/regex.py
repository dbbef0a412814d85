"""A regular expression compiled to a byte automaton with hashable states (guide.py's
interface): vLLM's ``guided_regex`` and a JSON schema string's ``pattern``.

The output must match the whole pattern (as vLLM's and outlines' guided regex do; a leading
``^`` and trailing ``$`` are accepted and mean the same). Supported: literals, ``.`` (any
character but a newline), classes ``[...]`` with ranges and negation, the escapes ``\\d \\D
\\w \\W \\s \\S`` (ASCII, as in ECMAScript, JSON Schema's dialect) ``\\n \\t \\r \\f \\v
\\xHH \\uHHHH`` and escaped metacharacters, groups ``(...)``
and ``(?:...)``, alternation ``|``, and the quantifiers ``* + ? {m} {m,} {m,n}`` (lazy forms
too: the language is the same). Backreferences, lookaround, word boundaries and flags are
refused with ``RegexError``: an output would not be held to them.

Compiled as Thompson's NFA over Unicode code points (a bounded repeat is unrolled, up to
``MAX_STATES``); a state is the set of NFA states reached (epsilon-closed, a frozenset) and
the bytes of a UTF-8 character begun but not finished. A byte that begins or continues a
character is taken only where some character with those leading bytes can still come, so a
token that ends mid-character never leads into a dead end.
"""

from __future__ import annotations

from functools import lru_cache

MAX_CP = 0x10FFFF
MAX_STATES = 20_000  # NFA states a pattern may unroll to
MAX_MOVES = 200_000  # (state set, character) moves an automaton remembers before it forgets
DIGITS = ((0x30, 0x39),)
WORD = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
SPACE = ((0x09, 0x0D), (0x20, 0x20))
ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "0": "\0"}


class RegexError(ValueError):
    """A pattern this compiler cannot hold an output to (or not a valid pattern)."""


@lru_cache(maxsize=256)
def compiled(pattern: str) -> Regex:
    """``Regex(pattern)``, compiled once per pattern (the request's check and its guide)."""
    return Regex(pattern)


def _negate(ranges) -> tuple:
    out, lo = [], 0
    for a, b in sorted(ranges):
        if a > lo:
            out.append((lo, a - 1))
        lo = max(lo, b + 1)
    if lo <= MAX_CP:
        out.append((lo, MAX_CP))
    return tuple(out)


def _merge(ranges) -> tuple:
    out = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return tuple(out)


class _Parser:
    """Recursive descent to a tree: ("set", ranges), ("cat", [..]), ("alt", [..]),
    ("rep", node, lo, hi or None), ("empty",)."""

    def __init__(self, pattern: str) -> None:
        self.p, self.i = pattern, 0

    def parse(self):
        if self.p.startswith("^"):
            self.i = 1
        node = self._alt()
        if self.i != len(self.p):
            raise RegexError(f"unbalanced ')' at {self.i} in {self.p!r}")
        return node

    def _peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def _alt(self):
        alts = [self._cat()]
        while self._peek() == "|":
            self.i += 1
            alts.append(self._cat())
        return alts[0] if len(alts) == 1 else ("alt", alts)

    def _cat(self):
        items = []
        while self._peek() not in (None, "|", ")"):
            if self._peek() == "$" and self.i == len(self.p) - 1:
                self.i += 1  # the end anchor: a whole match anyway
                break
            items.append(self._repeat(self._atom()))
        return ("cat", items) if items else ("empty",)

    def _repeat(self, node):
        while True:
            c = self._peek()
            if c in ("*", "+", "?"):
                self.i += 1
                node = ("rep", node, 0 if c != "+" else 1, 1 if c == "?" else None)
            elif c == "{" and (counted := self._counted()) is not None:
                node = ("rep", node, *counted)
            else:
                return node
            if self._peek() == "?":  # lazy: the same language
                self.i += 1
            elif self._peek() == "+":
                raise RegexError("possessive quantifiers are not supported")

    def _counted(self):
        """``{m}``, ``{m,}``, ``{m,n}`` at the cursor: (m, n or None), consumed; else None
        (a literal brace, as Python's re reads it)."""
        end = self.p.find("}", self.i)
        body = self.p[self.i + 1:end] if end > 0 else ""
        lo, sep, hi = body.partition(",")
        if lo == "" and sep and hi.isdigit():  # {,n}: Python's 0 to n
            lo = "0"
        if not lo.isdigit() or (hi and not hi.isdigit()):
            return None
        self.i = end + 1
        m, n = int(lo), (int(hi) if hi else (None if sep else int(lo)))
        if n is not None and n < m:
            raise RegexError(f"bad repeat {{{body}}}")
        return m, n

    def _atom(self):
        c = self.p[self.i]
        self.i += 1
        if c == "(":
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self._peek() == "?":
                raise RegexError(f"group syntax (?{self.p[self.i + 1:self.i + 2]}...) (lookaround, "
                                 f"flags, named groups) is not supported")
            node = self._alt()
            if self._peek() != ")":
                raise RegexError(f"missing ')' in {self.p!r}")
            self.i += 1
            return node
        if c == "[":
            return ("set", self._class())
        if c == ".":
            return ("set", _negate([(0x0A, 0x0A)]))
        if c == "\\":
            return ("set", self._escape())
        if c in "*+?":
            raise RegexError(f"nothing to repeat at {self.i - 1} in {self.p!r}")
        if c in "^$":
            raise RegexError(f"anchors inside a pattern ({c!r} at {self.i - 1}) are not supported")
        return ("set", ((ord(c), ord(c)),))

    def _escape(self) -> tuple:
        if self.i >= len(self.p):
            raise RegexError("a pattern cannot end with a backslash")
        c = self.p[self.i]
        self.i += 1
        classes = {"d": DIGITS, "w": WORD, "s": SPACE}
        if c.lower() in classes:
            ranges = classes[c.lower()]
            return _negate(ranges) if c.isupper() else ranges
        if c in ESCAPES:
            cp = ord(ESCAPES[c])
        elif c in "xu":
            n = 2 if c == "x" else 4
            digits = self.p[self.i:self.i + n]
            if len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise RegexError(f"bad \\{c} escape in {self.p!r}")
            self.i += n
            cp = int(digits, 16)
        elif c.isalnum():
            raise RegexError(f"the escape \\{c} (a backreference, a boundary or a class) is "
                             f"not supported")
        else:
            cp = ord(c)
        return ((cp, cp),)

    def _class(self) -> tuple:
        negate = self._peek() == "^"
        self.i += negate
        ranges, first = [], True
        while True:
            if self.i >= len(self.p):
                raise RegexError(f"missing ']' in {self.p!r}")
            c = self.p[self.i]
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            self.i += 1
            if c == "\\":
                item = self._escape()
            elif c == "[" and self._peek() == ":":
                raise RegexError("POSIX classes ([:alpha:]) are not supported")
            else:
                item = ((ord(c), ord(c)),)
            if (len(item) == 1 and item[0][0] == item[0][1] and self._peek() == "-"
                    and self.i + 1 < len(self.p) and self.p[self.i + 1] != "]"):
                self.i += 1
                hi_c = self.p[self.i]
                self.i += 1
                hi = self._escape()[0][0] if hi_c == "\\" else ord(hi_c)
                if hi < item[0][0]:
                    raise RegexError(f"bad range in {self.p!r}")
                item = ((item[0][0], hi),)
            ranges += item
        ranges = _merge(ranges)
        return _negate(ranges) if negate else ranges


class Regex:
    """The automaton of one pattern (``start``, ``step``, ``complete``, ``in_plain_string``);
    ``step_char`` moves a state set by a whole code point."""

    def __init__(self, pattern: str) -> None:
        if not isinstance(pattern, str):
            raise RegexError(f"a pattern must be a string, got {pattern!r}")
        self.edges: list[list[tuple[int, int, int]]] = []  # state -> (lo, hi, target)
        self.eps: list[list[int]] = []
        # (state set, code point) -> the next set: a mask's walk steps the same few sets by the
        # same characters over and over (1.4 s a new state for [A-Za-z ]{1,40} without it)
        self._moves: dict = {}
        tree = _Parser(pattern).parse()
        begin, self.accept = self._build(tree)
        self.start = (self._closure((begin,)), b"")

    # -- Thompson's construction ------------------------------------------------------------
    def _state(self) -> int:
        if len(self.edges) >= MAX_STATES:
            raise RegexError(f"the pattern unrolls to over {MAX_STATES} states (a large "
                             f"bounded repeat?)")
        self.edges.append([])
        self.eps.append([])
        return len(self.edges) - 1

    def _build(self, node) -> tuple[int, int]:
        kind = node[0]
        if kind == "empty":
            s = self._state()
            return s, s
        if kind == "set":
            a, b = self._state(), self._state()
            self.edges[a] += [(lo, hi, b) for lo, hi in node[1]]
            return a, b
        if kind == "cat":
            begin, end = self._build(node[1][0])
            for item in node[1][1:]:
                b2, e2 = self._build(item)
                self.eps[end].append(b2)
                end = e2
            return begin, end
        if kind == "alt":
            begin, end = self._state(), self._state()
            for item in node[1]:
                b2, e2 = self._build(item)
                self.eps[begin].append(b2)
                self.eps[e2].append(end)
            return begin, end
        _, inner, lo, hi = node  # rep: lo copies, then (hi - lo) optional ones or a loop
        begin = end = self._state()
        for _ in range(lo):
            b2, e2 = self._build(inner)
            self.eps[end].append(b2)
            end = e2
        if hi is None:
            b2, e2 = self._build(inner)
            self.eps[end].append(b2)
            self.eps[e2].append(b2)
            done = self._state()
            self.eps[end].append(done)
            self.eps[e2].append(done)
            return begin, done
        done = self._state()
        for _ in range(hi - lo):
            self.eps[end].append(done)
            b2, e2 = self._build(inner)
            self.eps[end].append(b2)
            end = e2
        self.eps[end].append(done)
        return begin, done

    def _closure(self, states) -> frozenset:
        seen, stack = set(states), list(states)
        while stack:
            for t in self.eps[stack.pop()]:
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        return frozenset(seen)

    # -- the automaton ----------------------------------------------------------------------
    def step_char(self, nfa: frozenset, cp: int) -> frozenset | None:
        key = (nfa, cp)
        nxt = self._moves.get(key)
        if nxt is None:
            if len(self._moves) >= MAX_MOVES:
                self._moves.clear()
            hits = [t for s in nfa for lo, hi, t in self.edges[s] if lo <= cp <= hi]
            nxt = self._moves[key] = self._closure(hits) if hits else frozenset()
        return nxt or None

    def can_take(self, nfa: frozenset, lo: int, hi: int) -> bool:
        """Whether some code point in [lo, hi] can come next."""
        return any(a <= hi and lo <= b for s in nfa for a, b, _ in self.edges[s])

    def step(self, state, b: int):
        nfa, pending = state
        if b < 0x80 and not pending:  # ASCII: most steps
            nxt = self.step_char(nfa, b)
            return None if nxt is None else (nxt, b"")
        data = pending + bytes((b,))
        cp, lo, hi = _utf8(data)
        if cp is None:  # a character begun: some character of this prefix must fit
            return (nfa, data) if lo is not None and self.can_take(nfa, lo, hi) else None
        nxt = self.step_char(nfa, cp)
        return None if nxt is None else (nxt, b"")

    def complete(self, state) -> bool:
        return state is not None and not state[1] and self.accept in state[0]

    def in_plain_string(self, state) -> bool:
        return False


def _utf8(data: bytes) -> tuple[int | None, int | None, int | None]:
    """(code point, None, None) for a whole UTF-8 character; (None, lo, hi) for a valid
    beginning of one, lo..hi the code points it may still become; (None, None, None) for
    bytes no character begins with."""
    b0 = data[0]
    if b0 < 0x80:
        return (b0, None, None) if len(data) == 1 else (None, None, None)
    if 0xC2 <= b0 <= 0xDF:
        n, lo, hi = 2, 0x80, 0x7FF
    elif 0xE0 <= b0 <= 0xEF:
        n, lo, hi = 3, 0x800, 0xFFFF
    elif 0xF0 <= b0 <= 0xF4:
        n, lo, hi = 4, 0x10000, MAX_CP
    else:
        return None, None, None
    if len(data) > n or any(not 0x80 <= c <= 0xBF for c in data[1:]):
        return None, None, None
    if len(data) == n:
        try:
            return ord(data.decode("utf-8")), None, None
        except UnicodeDecodeError:  # overlong or a surrogate
            return None, None, None
    # the code points whose encoding starts with these bytes
    shift = 6 * (n - len(data))
    head = (b0 & (0x7F >> n)) if n > 1 else b0
    for c in data[1:]:
        head = (head << 6) | (c & 0x3F)
    first, last = max(head << shift, lo), min(((head + 1) << shift) - 1, hi)
    if first > last or (first >= 0xD800 and last <= 0xDFFF):  # overlong, or surrogates only
        return None, None, None
    return None, first, last
