"""The byte-level JSON automaton against Python's json module."""

from __future__ import annotations

import json
import random

import pytest

from moebius.guided import json_grammar as jg

VALID = [
    "{}", ' {"a": 1} ', '{"a":[]}', '{"a":[[],[{}]]}', '\n{\t"k" :\r"v"}\n',
    '{"a": [1, -0, 2.5, -3.25e-3, 1E+9, 0.0e0, true, false, null, "", "x"]}',
    '{"esc": "\\" \\\\ \\/ \\b \\f \\n \\r \\t \\u00e9\\uD83D\\uDE00"}',
    '{"nested": {"b": {"c": {"d": [1, {"e": null}]}}}, "z": 0}',
    '{"utf8": "é ∑ 😀"}',
]
INVALID = [
    "[1]", "1", '"s"', "{", '{"a" 1}', '{"a":01}', '{"a":1,}', "{,}", '{"a":tru}',
    '{"a":"\x01"}', '{"a":1.}', '{"a":-}', '{"a":1e}', "{}}", '{"a":"\\x"}', "{'a': 1}",
    '{"a":"\\u12"}', '{"a":[1,]}', '{"a":[,1]}', '{a:1}', '{"a":1 "b":2}', '{"a":+1}',
    '{"a":.5}', '{"a":NaN}', '{"a":Infinity}', "{} {}",
]


@pytest.mark.parametrize("doc", VALID)
def test_a_valid_object_is_whole_and_each_prefix_alive(doc):
    data = doc.encode()
    assert isinstance(json.loads(doc), dict)
    assert jg.complete(jg.advance(jg.OBJECT, data))
    whole_from = len(doc.rstrip().encode())  # trailing whitespace: whole already
    for i in range(len(data)):
        state = jg.advance(jg.OBJECT, data[:i])
        assert state is not None and jg.complete(state) == (i >= whole_from), data[:i]


@pytest.mark.parametrize("doc", INVALID)
def test_what_is_not_one_object_is_refused(doc):
    assert not jg.complete(jg.advance(jg.OBJECT, doc.encode()))


def test_any_value_at_the_top():
    for doc in ("12", "-0.5e3", '"s"', "[1, 2]", "true", "null", "{}"):
        assert jg.complete(jg.advance(jg.VALUE_START, doc.encode())), doc


def test_agrees_with_json_loads_on_random_text():
    """Every string over JSON's own characters: the automaton ends whole exactly where
    json.loads reads an object (Python's extras NaN/Infinity cannot occur here), and a
    refused text has no completion json.loads would take."""
    alphabet = '{}[]:,"\\ 0123456789.-+eEtrufalsnbu ab'
    rng = random.Random(0)
    for _ in range(30000):
        doc = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        try:
            want = isinstance(json.loads(doc), dict)
        except ValueError:
            want = False
        assert jg.complete(jg.advance(jg.OBJECT, doc.encode())) == want, doc


def test_states_are_values():
    a = jg.advance(jg.OBJECT, b'{"a": [1, "x')
    b = jg.advance(jg.OBJECT, b'{"a":[1,"x')
    assert a == b and hash(a) == hash(b)
