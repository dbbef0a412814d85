"""JSON schemas compiled to the byte automaton: documents of the schema are taken whole, with
every prefix alive; others are refused; keywords it cannot enforce are refused at compile
time; masks equal trying every token."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moebius.guided import json_grammar as jg
from moebius.guided.guide import Guide, Vocabulary
from moebius.guided.json_schema import Schema, SchemaError, compiled, loosened
from tests.guided.test_guide import allowed_of, synthetic_vocab

PERSON = {"type": "object", "required": ["name", "age"], "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string"}},
    "nick": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}
ENUM = {"type": "object", "required": ["c"],
        "properties": {"c": {"enum": ["red", "green", 1, 12, None]}}}
TREE = {"$defs": {"Node": {"type": "object", "required": ["v"], "properties": {
    "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}}}}},
    "$ref": "#/$defs/Node"}
ANY = {"type": "object", "required": ["meta", "obj"],
       "properties": {"meta": {}, "obj": {"type": "object"}, "flag": {"type": "boolean"}}}
# a discriminated union (pydantic's Union of models with a Literal first field), in an array
# of one to two items: the tag's value chooses the object that the rest must be
SHAPES = {"type": "array", "minItems": 1, "maxItems": 2, "items": {"oneOf": [
    {"$ref": "#/$defs/Circle"},
    {"type": "object", "required": ["kind", "w"], "properties": {
        "kind": {"enum": ["rect", "square"]}, "w": {"type": "number"},
        "h": {"type": "number"}}},
    {"type": "object", "required": ["kind"], "properties": {"kind": {"const": 7}}},
    {"type": "object", "required": ["kind"], "properties": {"kind": {"const": 78}}}]},
    "$defs": {"Circle": {"type": "object", "required": ["kind", "r"], "properties": {
        "kind": {"const": "circle"}, "r": {"type": "number"}}}}}
CASES = [
    (PERSON, ['{"name": "a", "age": 3}', '{"name":"a","age":-3,"tags":[],"nick":null}',
              '{ "name" : "x\\"y" , "age" : 0 , "nick" : "y" }',
              '{"name":"a","age":1,"tags":["x","y"]}'],
     ['{"age": 3, "name": "a"}', '{"name": "a"}', '{"name": "a", "age": 3.5}',
      '{"name":"a","age":3,"extra":1}', '{"name":1,"age":2}', "{}",
      '{"name":"a","age":1,"nick":3}', '{"name":"a","age":1,}', '{"name":"a","age":01}']),
    (ENUM, ['{"c":"red"}', '{"c":1}', '{"c":12}', '{"c":null}', '{"c": 12 }'],
     ['{"c":"blue"}', '{"c":123}', '{"c":2}', '{"c":"re"}']),
    (TREE, ['{"v":1}', '{"v":1,"kids":[{"v":2,"kids":[]},{"v":3}]}'],
     ['{"v":1,"kids":[{"kids":[]}]}', '{"v":1,"kids":[1]}']),
    (ANY, ['{"meta": [1, {"a": "b"}], "obj": {"x": [true]}}', '{"meta": 5, "obj": {}}',
           '{"meta": 5 , "obj":{} , "flag": false}'],
     ['{"meta": 5, "obj": []}', '{"meta": 5}', '{"meta": 5, "obj": {}, "flag": 1}']),
    ({"type": "array", "items": {"type": "number"}}, ["[1, 2.5, -3e2]", "[]"],
     ["[1,]", '["a"]', "[1 2]"]),
    ({"type": ["string", "null"]}, ['"x"', "null"], ["1", "nul"]),
    ({"const": {"a": [1, "b"]}}, ['{"a": [1, "b"]}'], ['{"a":[1,"b"]}', "{}"]),
    (True, ["1", '{"a": null}', "[]"], ["[", "}"]),
    ({"type": "string", "pattern": r"[a-z]{2}\d"}, ['"ab1"'],
     ['"ab"', '"ab12"', '"a\\u0062c"', '"AB1"']),
    ({"type": "string", "format": "date"}, ['"2026-12-07"', '"2024-02-29"'],
     ['"2026-13-01"', '"2026-1-01"', '"2026-12-07T00:00:00Z"']),
    ({"type": "string", "format": "date-time"}, ['"2026-12-07T23:40:00Z"',
                                                  '"2026-12-07T23:40:00.123+01:00"'],
     ['"2026-12-07 23:40:00Z"', '"2026-12-07T24:00:00Z"']),
    ({"type": ["string", "null"], "format": "uuid"},
     ['"123e4567-e89b-12d3-a456-426614174000"', "null"], ['"123e4567"', "1"]),
    ({"type": "string", "minLength": 2, "maxLength": 3},
     ['"ab"', '"a\\"b"', '"éü"', '"\\u00e9\\n"', '"abc"'],
     ['"a"', '"abcd"', '"\\u00e9"', '""', '"é"']),
    ({"type": "string", "minLength": 1}, ['"a"', '"' + "x" * 50 + '"'], ['""']),
    (SHAPES, ['[{"kind": "circle", "r": 1}]',
              '[{"kind":"rect","w":2,"h":3},{"kind":"square","w":1}]',
              '[{"kind": 7}]', '[{"kind":78}, {"kind" : 7 }]'],
     ["[]", '[{"kind": "circle", "w": 1}]', '[{"kind": "rect", "r": 1}]', '[{"r": 1}]',
      '[{"kind": "circle"}]', '[{"kind":7},{"kind":7},{"kind":7}]', '[{"kind": 8}]',
      '[{"kind": "rect", "w": 1, "r": 2}]']),
]


def run(schema: Schema, text: str):
    return jg.advance(schema.start, text.encode(), schema.step)


@pytest.mark.parametrize("spec,good,bad", CASES)
def test_documents_of_the_schema_and_no_others(spec, good, bad):
    schema = Schema(spec)
    for doc in good:
        json.loads(doc)
        for i in range(len(doc)):
            assert run(schema, doc[:i]) is not None, doc[:i]
        assert schema.complete(run(schema, doc)), doc
    for doc in bad:
        assert not schema.complete(run(schema, doc)), doc


@pytest.mark.parametrize("spec,match", [
    ({"type": "integer", "minimum": 0}, "minimum cannot be enforced"),
    ({"type": "string", "pattern": "a+", "format": "date"}, "together are not supported"),
    ({"type": "string", "pattern": "a+", "maxLength": 3}, "together are not supported"),
    ({"type": "string", "format": "hostname"}, "format 'hostname' cannot be enforced"),
    ({"type": "string", "pattern": "(a"}, "pattern: missing"),
    ({"type": "integer", "format": "int32"}, "format cannot be enforced on type 'integer'"),
    ({"type": "string", "minLength": 3, "maxLength": 2}, "below minLength"),
    ({"anyOf": [{"type": "object"}, {"type": "object"}]}, "begin with the same byte"),
    ({"anyOf": [{"type": "number"}, {"type": "integer"}]}, "begin with the same byte"),
    ({"anyOf": [{"type": "object", "required": ["k"], "properties": {"k": {"const": 1}}},
                {"type": "object", "required": ["k"], "properties": {"k": {"enum": [2, 1]}}}]},
     "begin with the same byte"),  # a tag value in two alternatives
    ({"anyOf": [{"type": "object", "properties": {"k": {"const": 1}}},
                {"type": "object", "properties": {"k": {"const": 2}}}]},
     "begin with the same byte"),  # the tag must be required
    ({"type": "array", "minItems": 2, "maxItems": 1}, "below minItems"),
    ({"type": "array", "minItems": -1}, "non-negative integer"),
    ({"$ref": "#/nope"}, "does not resolve"),
    ({"$ref": "http://x/s.json"}, "only local"),
    ({"type": "foo"}, "unknown type"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "not properties"),
    ({"enum": []}, "non-empty list"),
    (False, "must be an object or true"),
])
def test_what_cannot_be_enforced_is_refused(spec, match):
    with pytest.raises(SchemaError, match=match):
        Schema(spec)


def test_loosened_drops_value_bounds_wherever_a_schema_sits():
    spec = {"type": "object", "required": ["format"], "minProperties": 1, "properties": {
        "format": {"type": "string", "format": "date", "maxLength": 10},
        "n": {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "null"}]},
        "xs": {"type": "array", "items": {"$ref": "#/$defs/X"}, "minItems": 1}},
        "$defs": {"X": {"type": "string", "pattern": "a+"}}}
    loose = loosened(spec)
    assert loose == {"type": "object", "required": ["format"], "properties": {
        "format": {"type": "string"},  # a property named like a keyword stays
        "n": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        "xs": {"type": "array", "items": {"$ref": "#/$defs/X"}, "minItems": 1}},
        "$defs": {"X": {"type": "string"}}}
    assert Schema(loose).complete(run(Schema(loose), '{"format": "x", "xs": ["b"]}'))
    with pytest.raises(SchemaError, match="minProperties cannot be enforced"):
        Schema(spec)


def test_schema_masks_equal_trying_every_token():
    tokens = synthetic_vocab(3000, 5)
    tokens[:12] = [b'"name"', b'"age"', b'"na', b"me", b'":', b"12", b"a", b'"', b"null", b"}",
                   b"[", b"]"]
    eos = [len(tokens) - 1]
    tokens[-1] = None
    vocab = Vocabulary(tokens, eos)
    grammar = Guide(vocab, "schema", PERSON).grammar
    schema = grammar.automaton
    doc = b'{"name": "a\\u00e9", "age": -12, "tags": ["x", "y"], "nick": null} '
    for i in range(len(doc) + 1):
        state = run(schema, doc[:i].decode())
        got = allowed_of(vocab.mask(grammar, state), len(tokens))
        want = np.array([b is not None and jg.advance(state, b, schema.step) is not None
                         for b in tokens])
        want[eos] = schema.complete(state)
        assert (got == want).all(), (doc[:i], np.flatnonzero(got != want)[:5])


def test_one_compiled_schema_per_distinct_schema():
    vocab = Vocabulary([b"{", b"}"], [])
    xy = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {}}}
    a = vocab.grammar("schema", xy)
    assert vocab.grammar("schema", json.loads(json.dumps(xy))) is a
    assert a.automaton.inner is compiled(xy)  # the one the request's parameters were checked with
    # the same keywords in another order: properties in another order are another schema
    yx = {"type": "object", "properties": {"y": {}, "x": {"type": "integer"}}}
    b = vocab.grammar("schema", yx)
    assert b is not a and vocab.grammar("schema", True) is not a
    assert run(a.automaton, '{"x": 1, "y": 2}') and not run(b.automaton, '{"x": 1, "y": 2}')
