"""Regular expressions compiled to the byte automaton (moebius/guided/regex.py): a whole
match by Python's re is a whole match here and nothing else is, on random strings over an
alphabet with multi-byte characters; every byte prefix of a match stays alive, a byte that
leads only into dead ends (mid-character) is refused at once; what cannot be enforced is
refused at compile time; masks equal trying every token."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from moebius.guided import json_grammar as jg
from moebius.guided.guide import Guide, Vocabulary
from moebius.guided.regex import Regex, RegexError
from tests.guided.test_guide import allowed_of, synthetic_vocab

PATTERNS = [r"[a-z]+", r"\d{3}-\d{4}", r"(foo|bar)+baz?", r"[^\s]{2,5}", r"a.c", r"(?:ab)*",
            r"é+ü", r"[α-ω]{2}", r"x{2,}", r"\w+@\w+\.com", r"(a|b|)c", r"[-a]+", r"[\]]",
            r"a{0}", r"-?\d+(\.\d+)?", r"^ab$", r"a{,3}", r"[^a-z]*?", r"\u00e9\x41"]
ALPHABET = "abcxyzfoobar0123456789-.@é üαβωA\n],{}"


def run(rx: Regex, text: str):
    return jg.advance(rx.start, text.encode(), rx.step)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_whole_matches_as_python_re(pattern):
    rx, ref = Regex(pattern), re.compile(pattern)
    rng = random.Random(pattern)
    for _ in range(300):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 7)))
        assert rx.complete(run(rx, text)) == bool(ref.fullmatch(text)), text
        if ref.fullmatch(text):
            data = text.encode()
            assert all(jg.advance(rx.start, data[:i], rx.step) is not None
                       for i in range(len(data)))


def test_a_character_is_taken_only_where_it_can_finish():
    rx = Regex("é")  # C3 A9
    assert rx.step(rx.start, 0xC3) is not None
    assert rx.step(rx.start, 0xC4) is None  # Ą..ſ: none of them is é
    assert rx.step(rx.step(rx.start, 0xC3), 0xA8) is None  # è
    assert rx.step(rx.start, 0xE0) is None and rx.step(rx.start, 0xFF) is None
    assert not rx.complete(rx.step(rx.start, 0xC3))


@pytest.mark.parametrize("pattern,match", [
    (r"(a)\1", "backreference"), (r"(?=a)", "lookaround"), (r"\b", "boundary"),
    ("(a", "missing '\\)'"), ("a)", "unbalanced"), ("*a", "nothing to repeat"),
    ("a{3,1}", "bad repeat"), ("[a", "missing '\\]'"), ("a{100000}", "unrolls"),
    ("a^b", "anchors"), ("[[:alpha:]]", "POSIX"), ("a++", "possessive"),
])
def test_what_cannot_be_enforced_is_refused(pattern, match):
    with pytest.raises(RegexError, match=match):
        Regex(pattern)


def test_regex_masks_equal_trying_every_token():
    tokens = synthetic_vocab(3000, 7)
    tokens[:6] = ["é".encode(), "é".encode()[:1], "é".encode()[1:], b"-1", b"12", b"."]
    eos = [len(tokens) - 1]
    tokens[-1] = None
    vocab = Vocabulary(tokens, eos)
    grammar = Guide(vocab, "regex", r"-?\d+(\.\d+)?é?").grammar
    rx = grammar.automaton
    doc = "-12.5é".encode()
    for i in range(len(doc) + 1):
        state = jg.advance(rx.start, doc[:i], rx.step)
        got = allowed_of(vocab.mask(grammar, state), len(tokens))
        want = np.array([b is not None and jg.advance(state, b, rx.step) is not None
                         for b in tokens])
        want[eos] = rx.complete(state)
        assert (got == want).all(), (doc[:i], np.flatnonzero(got != want)[:5])
