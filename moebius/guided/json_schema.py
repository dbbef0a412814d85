"""A JSON schema compiled to a byte-level automaton whose states are hashable values.

The subset that generators use (OpenAI's structured outputs, pydantic's ``model_json_schema``):
``type`` (object, array, string, number, integer, boolean, null, or a list of them), object
``properties`` with ``required``, array ``items`` with ``minItems``/``maxItems``, ``enum``,
``const``, ``anyOf``/``oneOf`` whose alternatives begin with different bytes (``Optional[X]``: X
or null) or are objects told apart by their first property (a required ``const``/``enum``, as
a discriminated union or a forced tool call's ``name``), ``$ref`` into ``$defs``/
``definitions`` (recursion included), ``{}`` (any value), and strings held to a ``pattern``
(regex.py; its text raw, without escapes), a ``format`` of ``FORMATS`` (date, time,
date-time, uuid, ipv4, email: a pattern each) or ``minLength``/``maxLength`` (characters,
an escape sequence one). Annotations (title, description, default, examples, ...) are
ignored. Every other keyword (minimum, multipleOf, allOf, ...) is refused with
``SchemaError``: an output would not be held to it; ``loosened`` drops the value bounds from
a schema that need not be held to them (a non-strict response format, a tool's parameters,
as OpenAI's non-strict modes do).

As OpenAI's strict mode and xgrammar do: properties come in the schema's order (an optional
one may be skipped, a required one may not), and no others (``additionalProperties`` is not
followed); whitespace may go between tokens, as JSON allows (guide.BoundedWhitespace bounds
its runs).

A state is ``(frames, mode, aux)``: ``frames`` the open containers as (node, progress) pairs
(an object's progress: the index of the next property it may take; an array's: the items
begun, counted up to the largest bound), ``mode`` where the next byte goes, ``aux`` what the
mode needs (the node of a value to come, the remaining bytes of candidate keys, enum or tag
values, a nested any-value state of json_grammar.py). A tagged union's object is the union's
node until its tag's value is read, then the chosen alternative's.
"""

from __future__ import annotations

import json
from functools import lru_cache

from moebius.guided import json_grammar as jg
from moebius.guided import regex
from moebius.guided.regex import RegexError

ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id",
                         "$comment", "deprecated", "readOnly", "writeOnly", "$defs",
                         "definitions", "additionalProperties", "strict", "discriminator"})
SUPPORTED = frozenset({"type", "properties", "required", "items", "minItems", "maxItems",
                       "enum", "const", "anyOf", "oneOf", "$ref", "pattern", "format",
                       "minLength", "maxLength"})
STRING_KEYWORDS = frozenset({"pattern", "format", "minLength", "maxLength"})
_DATE = r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
_TIME = r"([01]\d|2[0-3]):[0-5]\d:([0-5]\d|60)(\.\d+)?(Z|[+-]([01]\d|2[0-3]):[0-5]\d)"
_OCTET = r"(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# string formats held to a pattern (RFC 3339's full-date/full-time/date-time, RFC 4122,
# dotted IPv4, and an address of the common shape): a document of one is valid for the format
FORMATS = {
    "date": _DATE,
    "time": _TIME,
    "date-time": _DATE + "T" + _TIME,
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "ipv4": rf"({_OCTET}\.){{3}}{_OCTET}",
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
}
# bounds on values (not on structure) that ``loosened`` drops
VALUE_BOUNDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                          "multipleOf", "minLength", "maxLength", "pattern", "format",
                          "minProperties", "maxProperties", "uniqueItems", "contentEncoding",
                          "contentMediaType"})
SIMPLE_TYPES = ("string", "number", "integer", "boolean", "null", "object", "array")

# modes; STR/ESC/HEX read a string's body as json_grammar does
(VALUE, OBJ_FIRST, KEY_WAIT, KEYNAME, COLON, AFTER, DONE, ENUM, ANY, NUMBER, LITERAL, STR, ESC,
 HEX, TAG, PSTR, LSTR) = range(17)


class SchemaError(ValueError):
    """A schema this compiler cannot hold an output to."""


def compiled(spec) -> Schema:
    """``Schema(spec)``, compiled once per distinct schema (a request's is checked when its
    parameters are made and used by the engine's guide: one compile for both). The key keeps
    the schema's key order: properties come in it."""
    return _compiled(json.dumps(spec))


@lru_cache(maxsize=256)
def _compiled(text: str) -> Schema:
    return Schema(json.loads(text))


def _bounds(s: dict, low: str, high: str, where: str) -> tuple[int, int | None]:
    """A count's bounds (``minItems``/``maxItems``, ``minLength``/``maxLength``): the lower
    one 0 and the upper one None where left out."""
    lo, hi = s.get(low, 0), s.get(high)
    for name, n in ((low, lo), (high, hi)):
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
            raise SchemaError(f"{where}: {name} must be a non-negative integer")
    if hi is not None and hi < lo:
        raise SchemaError(f"{where}: {high} {hi} is below {low} {lo}")
    return lo, hi


def loosened(s):
    """``s`` without its bounds on values (``VALUE_BOUNDS``, wherever a schema sits in it):
    the structure, types, enums and required properties stay."""
    if not isinstance(s, dict):
        return s
    out = {k: v for k, v in s.items() if k not in VALUE_BOUNDS}
    for k in ("properties", "$defs", "definitions"):
        if isinstance(out.get(k), dict):
            out[k] = {name: loosened(v) for name, v in out[k].items()}
    for k in ("anyOf", "oneOf"):
        if isinstance(out.get(k), list):
            out[k] = [loosened(v) for v in out[k]]
    if "items" in out:
        out["items"] = loosened(out["items"])
    return out


class Schema:
    """The compiled nodes of one schema, and its automaton (``start``, ``step``,
    ``complete``, ``in_plain_string``: guide.py's interface)."""

    def __init__(self, schema) -> None:
        self.root = schema
        self.nodes: list[tuple] = []
        self._refs: dict[str, int] = {}
        self.start = ((), VALUE, self._compile(schema, "#"))

    # -- compiling ------------------------------------------------------------------------
    def _new(self) -> int:
        self.nodes.append(())
        return len(self.nodes) - 1

    def _compile(self, s, where: str) -> int:
        if s is True or s == {}:
            return self._set(self._new(), ("any",))
        if not isinstance(s, dict):
            raise SchemaError(f"{where}: a schema must be an object or true, got {s!r}")
        unknown = sorted(set(s) - SUPPORTED - ANNOTATIONS)
        if unknown:
            raise SchemaError(f"{where}: {', '.join(unknown)} cannot be enforced (supported: "
                              f"{', '.join(sorted(SUPPORTED))})")
        if "$ref" in s:
            if set(s) & (SUPPORTED - {"$ref"}):
                raise SchemaError(f"{where}: $ref with other keywords is not supported")
            return self._ref(s["$ref"], where)
        node = self._new()
        if "const" in s or "enum" in s:
            values = [s["const"]] if "const" in s else s["enum"]
            if not isinstance(values, list) or not values:
                raise SchemaError(f"{where}: enum must be a non-empty list")
            texts = tuple(sorted({json.dumps(v, ensure_ascii=False).encode() for v in values}))
            return self._set(node, ("enum", texts))
        alts = s.get("anyOf", s.get("oneOf"))
        if alts is not None:
            if not isinstance(alts, list) or not alts:
                raise SchemaError(f"{where}: anyOf/oneOf must be a non-empty list")
            ids = tuple(self._compile(a, f"{where}/anyOf/{i}") for i, a in enumerate(alts))
            tags = self._tags(ids)
            if tags is not None:  # objects told apart by their first property's value
                key = self._resolve(ids[0])[1][0][0]
                tag = self._set(self._new(), ("tag", tags))
                return self._set(node, ("tagged", ((key, True, tag),)))
            return self._set(node, ("union", ids), where)
        kind = s.get("type")
        if kind is None:
            kind = "object" if "properties" in s else "array" if "items" in s else None
        if kind is None:
            return self._set(node, ("any",))
        if isinstance(kind, list):  # the string keywords go with "string" alone
            ids = tuple(self._compile({**{k: v for k, v in s.items() if k not in STRING_KEYWORDS
                                          or t == "string"}, "type": t}, f"{where}/type/{t}")
                        for t in kind)
            return self._set(node, ("union", ids), where)
        if kind not in SIMPLE_TYPES:
            raise SchemaError(f"{where}: unknown type {kind!r}")
        if kind == "string" and STRING_KEYWORDS & set(s):
            return self._set(node, self._string(s, where))
        if STRING_KEYWORDS & set(s):
            raise SchemaError(f"{where}: {', '.join(sorted(STRING_KEYWORDS & set(s)))} cannot be "
                              f"enforced on type {kind!r} (strings only)")
        if kind == "object":
            props = s.get("properties")
            if props is None:
                return self._set(node, ("any_object",))
            required = set(s.get("required", ()))
            unknown_required = required - set(props)
            if unknown_required:
                raise SchemaError(f"{where}: required names {sorted(unknown_required)} that "
                                  f"are not properties")
            entries = tuple(
                (json.dumps(k, ensure_ascii=False).encode()[1:], k in required,
                 self._compile(v, f"{where}/properties/{k}")) for k, v in props.items())
            return self._set(node, ("object", entries))
        if kind == "array":
            lo, hi = _bounds(s, "minItems", "maxItems", where)
            item = self._compile(s.get("items", True), f"{where}/items")
            return self._set(node, ("array", item, lo, hi))
        return self._set(node, (kind,))

    def _string(self, s: dict, where: str) -> tuple:
        """A string held to a ``pattern`` (or a ``format``'s), or to ``minLength``/
        ``maxLength``; one kind of bound a string."""
        pattern, fmt = s.get("pattern"), s.get("format")
        lengths = "minLength" in s or s.get("maxLength") is not None
        if (pattern is not None) + (fmt is not None) + lengths > 1:
            raise SchemaError(f"{where}: pattern, format and minLength/maxLength together are "
                              f"not supported (one of them a string)")
        if fmt is not None:
            if fmt not in FORMATS:
                raise SchemaError(f"{where}: format {fmt!r} cannot be enforced (supported: "
                                  f"{', '.join(sorted(FORMATS))})")
            pattern = FORMATS[fmt]
        if pattern is not None:
            try:
                return ("pstring", regex.compiled(pattern))
            except RegexError as e:
                raise SchemaError(f"{where}: pattern: {e}") from None
        return ("lstring", *_bounds(s, "minLength", "maxLength", where))

    def _set(self, node: int, spec: tuple, where: str = "") -> int:
        self.nodes[node] = spec
        if spec[0] == "union":
            firsts = [self._first_bytes(a, set()) for a in spec[1]]
            for i, a in enumerate(firsts):
                for b in firsts[i + 1:]:
                    if a & b:
                        raise SchemaError(f"{where}: anyOf/oneOf alternatives that can begin "
                                          f"with the same byte are not supported")
        return node

    def _tags(self, ids: tuple) -> tuple | None:
        """For alternatives that are all objects whose first property is the same required
        name with a const/enum value, no value in two of them: (value bytes, object node)
        pairs, sorted; else None."""
        if len(ids) < 2 or any(not self.nodes[i] for i in ids):  # a ref still compiling
            return None
        specs = [self._resolve(i) for i in ids]
        if any(s[0] != "object" or not s[1] or not s[1][0][1] for s in specs):
            return None
        if len({s[1][0][0] for s in specs}) != 1:
            return None
        pairs = []
        for i, s in zip(ids, specs, strict=True):
            value = self.nodes[s[1][0][2]] and self._resolve(s[1][0][2])
            if not value or value[0] != "enum":
                return None
            pairs += [(text, self._target(i)) for text in value[1]]
        if len({text for text, _ in pairs}) < len(pairs):
            return None
        return tuple(sorted(pairs))

    def _target(self, node: int) -> int:
        """``node`` past its aliases (a $ref's node is an alias of its target's)."""
        while self.nodes[node][0] == "alias":
            node = self.nodes[node][1]
        return node

    def _first_bytes(self, node: int, seen: set) -> frozenset:
        spec = self.nodes[node]
        kind = spec[0] if spec else "ref"
        if kind in ("any",) or node in seen or not spec:
            return frozenset(range(256))
        seen.add(node)
        table = {"string": b'"', "number": b"-0123456789", "integer": b"-0123456789",
                 "boolean": b"tf", "null": b"n", "object": b"{", "any_object": b"{",
                 "array": b"[", "tagged": b"{", "pstring": b'"', "lstring": b'"'}
        if kind in table:
            return frozenset(table[kind])
        if kind in ("enum", "tag"):
            return frozenset(t[0][0] if kind == "tag" else t[0] for t in spec[1])
        if kind == "alias":
            return self._first_bytes(spec[1], seen)
        return frozenset().union(*(self._first_bytes(a, seen) for a in spec[1]))

    def _ref(self, ref, where: str) -> int:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaError(f"{where}: only local $ref (#/...) is supported, got {ref!r}")
        if ref in self._refs:
            return self._refs[ref]
        target = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise SchemaError(f"{where}: $ref {ref!r} does not resolve")
            target = target[part]
        # a placeholder first, so that a recursive reference finds it
        node = self._refs[ref] = self._new()
        self.nodes[node] = ("alias", self._compile(target, ref))
        return node

    # -- the automaton ----------------------------------------------------------------------
    def _resolve(self, node: int) -> tuple:
        return self.nodes[self._target(node)]

    def step(self, state, b: int):
        """The state after byte ``b``, or None where ``b`` cannot come next."""
        frames, mode, aux = state
        if mode == STR:
            if b == 0x22:
                return self._after(frames)
            if b == 0x5C:
                return (frames, ESC, 0)
            return state if b >= 0x20 else None
        if mode == ESC:
            if b not in jg.ESCAPES:
                return None
            return (frames, HEX, 4) if b == 0x75 else (frames, STR, 0)
        if mode == HEX:
            if b not in jg.HEX:
                return None
            return (frames, HEX, aux - 1) if aux > 1 else (frames, STR, 0)
        if mode == NUMBER:  # aux: (json_grammar's number mode, integer only)
            nmode, integer = aux
            nxt = jg._number(nmode, b)
            if nxt is not None and not (integer and nxt in (jg.N_DOT, jg.N_E)):
                return (frames, NUMBER, (nxt, integer))
            if nmode not in jg.NUMBER_ENDS:
                return None
            return self.step(self._after(frames), b)  # the number ended: b comes after it
        if mode == ENUM:  # aux: the remaining bytes of the values still possible
            rests = tuple(r[1:] for r in aux if r and r[0] == b)
            if rests:
                return (frames, ENUM, rests)
            if b"" in aux:  # one value is whole and b does not extend another (1 vs 12)
                return self.step(self._after(frames), b)
            return None
        if mode == PSTR:  # aux: (regex, its state); no escapes (the pattern reads raw text)
            rx, r = aux
            if b == 0x22:
                return self._after(frames) if rx.complete(r) else None
            if b == 0x5C or b < 0x20:
                return None
            nxt = rx.step(r, b)
            return None if nxt is None else (frames, PSTR, (rx, nxt))
        if mode == LSTR:  # aux: (min, max, characters so far up to the bound, escape progress)
            return self._length_string(frames, aux, b)
        if mode == TAG:  # aux: (remaining bytes, object node) of the tag values still possible
            rests = tuple((r[1:], n) for r, n in aux if r and r[0] == b)
            if len(rests) == 1 and not rests[0][0]:  # a string's closing quote
                return self._tagged(frames, rests[0][1])
            if rests:
                return (frames, TAG, rests)
            whole = [n for r, n in aux if not r]  # a number or literal, b after it
            return self.step(self._tagged(frames, whole[0]), b) if whole else None
        if mode == KEYNAME:  # aux: (remaining bytes up to the closing quote, index) pairs
            rests = tuple((r[1:], i) for r, i in aux if r and r[0] == b)
            for r, i in rests:
                if not r:  # the key's closing quote: no other key can be whole too
                    node, _ = frames[-1]
                    value = self._resolve(node)[1][i][2]
                    return (frames[:-1] + ((node, i + 1),), COLON, value)
            return (frames, KEYNAME, rests) if rests else None
        if mode == ANY:  # aux: json_grammar's state of a value of any kind
            inner = jg.step(aux, b)
            if inner is not None:
                return (frames, ANY, inner)
            if not jg.complete(aux):
                return None
            return self.step(self._after(frames), b)
        if mode == LITERAL:
            if b != aux[0]:
                return None
            return (frames, LITERAL, aux[1:]) if len(aux) > 1 else self._after(frames)
        if b in jg.WS:
            return state
        if mode == VALUE:
            return self._value(frames, aux, b)
        if mode == COLON:
            return (frames, VALUE, aux) if b == 0x3A else None
        if mode == KEY_WAIT:
            return self._key(frames, b)
        if mode == OBJ_FIRST or mode == AFTER:
            return self._in_container(frames, mode, b)
        return None  # DONE: whitespace only (above)

    def _value(self, frames, node: int, b: int):
        spec = self._resolve(node)
        kind = spec[0]
        if kind == "union":
            for alt in spec[1]:
                nxt = self._value(frames, alt, b)
                if nxt is not None:
                    return nxt
            return None
        if kind == "any":
            inner = jg.step(jg.VALUE_START, b)
            return None if inner is None else (frames, ANY, inner)
        if kind == "any_object":
            return (frames, ANY, jg.step(jg.OBJECT, b)) if b == 0x7B else None
        if kind == "string":
            return (frames, STR, 0) if b == 0x22 else None
        if kind == "pstring":
            return (frames, PSTR, (spec[1], spec[1].start)) if b == 0x22 else None
        if kind == "lstring":
            return (frames, LSTR, (spec[1], spec[2], 0, 0)) if b == 0x22 else None
        if kind in ("number", "integer"):
            if b == 0x2D:
                return (frames, NUMBER, (jg.N_MINUS, kind == "integer"))
            if b in jg.DIGITS:
                return (frames, NUMBER, (jg.N_ZERO if b == 0x30 else jg.N_INT,
                                         kind == "integer"))
            return None
        if kind == "boolean":
            rest = {0x74: b"rue", 0x66: b"alse"}.get(b)
            return None if rest is None else (frames, LITERAL, rest)
        if kind == "null":
            return (frames, LITERAL, b"ull") if b == 0x6E else None
        if kind == "enum":
            return self.step((frames, ENUM, spec[1]), b)
        if kind == "tag":
            return self.step((frames, TAG, spec[1]), b)
        if kind in ("object", "tagged"):
            return (frames + ((node, 0),), OBJ_FIRST, 0) if b == 0x7B else None
        if kind == "array":
            return (frames + ((node, 0),), OBJ_FIRST, 0) if b == 0x5B else None
        return None

    def _key(self, frames, b: int):
        """The opening quote of the next property's name: those from the frame's progress up
        to the first required one may come."""
        node, progress = frames[-1]
        entries = self._resolve(node)[1]
        names = []
        for i in range(progress, len(entries)):
            names.append((entries[i][0], i))
            if entries[i][1]:
                break
        return (frames, KEYNAME, tuple(names)) if b == 0x22 and names else None

    def _in_container(self, frames, mode: int, b: int):
        node, progress = frames[-1]
        spec = self._resolve(node)
        if spec[0] == "array":  # progress: the items begun, up to the largest bound
            _, item, lo, hi = spec
            if b == 0x5D:  # ]
                return self._after(frames[:-1]) if progress >= lo else None
            if hi is not None and progress >= hi:
                return None
            begun = frames[:-1] + ((node, min(progress + 1, max(lo, hi or 0))),)
            if mode == AFTER:
                return (begun, VALUE, item) if b == 0x2C else None
            return self._value(begun, item, b)
        entries = spec[1]
        if b == 0x7D:  # }: only once every required property is given
            return None if any(e[1] for e in entries[progress:]) else self._after(frames[:-1])
        if mode == AFTER:
            if b != 0x2C or progress >= len(entries):
                return None
            return (frames, KEY_WAIT, 0)
        return self._key(frames, b)

    def _length_string(self, frames, aux, b: int):
        """A string body counted in characters (an escape sequence is one, a UTF-8
        character one): ``esc`` 0 outside an escape, -1 after the backslash, else the hex
        digits left of a \\u escape."""
        lo, hi, n, esc = aux
        if esc == -1:
            if b not in jg.ESCAPES:
                return None
            return (frames, LSTR, (lo, hi, n, 4 if b == 0x75 else 0))
        if esc:
            return (frames, LSTR, (lo, hi, n, esc - 1)) if b in jg.HEX else None
        if b == 0x22:
            return self._after(frames) if n >= lo else None
        if b < 0x20:
            return None
        if 0x80 <= b < 0xC0:  # a UTF-8 continuation: the character is counted
            return (frames, LSTR, aux)
        if hi is not None and n >= hi:
            return None
        n = min(n + 1, max(lo, hi or 0))
        return (frames, LSTR, (lo, hi, n, -1 if b == 0x5C else 0))

    def _tagged(self, frames, obj: int):
        """The tag's value is read: the rest is the chosen alternative's object."""
        return self._after(frames[:-1] + ((obj, 1),))

    def _after(self, frames):
        return (frames, AFTER if frames else DONE, 0)

    def complete(self, state) -> bool:
        """Whether the bytes read so far are a whole document of the schema."""
        if state is None:
            return False
        frames, mode, aux = state
        if frames:
            return False
        if mode == DONE:
            return True
        if mode == NUMBER:
            return aux[0] in jg.NUMBER_ENDS
        if mode == ANY:
            return jg.complete(aux)
        return mode == ENUM and b"" in aux

    def in_plain_string(self, state) -> bool:
        return state is not None and state[1] == STR

    def between_tokens(self, state) -> bool:
        """Whether whitespace here is JSON's between tokens (not a string's text, a pattern's,
        a key's or an enum value's)."""
        mode = state[1]
        if mode == ANY:
            return jg.between_tokens(state[2])
        return mode in (VALUE, OBJ_FIRST, KEY_WAIT, COLON, AFTER, DONE, NUMBER)
