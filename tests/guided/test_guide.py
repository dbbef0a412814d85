"""Token bytes of both vocabulary kinds, and the guide's masks against trying every token."""

from __future__ import annotations

import random

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from moebius.guided import json_grammar as jg
from moebius.guided.guide import WHITESPACE_RUN, Guide, Vocabulary
from moebius.guided.token_bytes import token_bytes
from moebius.model.tiny import SPECIAL_TOKENS, train_tokenizer


def allowed_of(mask: bytes, size: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(mask, np.uint8), bitorder="little")[:size].astype(bool)


def test_byte_level_tokens_decode_to_their_bytes():
    tok = train_tokenizer()
    tb = token_bytes(tok, tok.get_vocab_size() + 64)  # the model's padded rows: None
    assert tb[tok.get_vocab_size():] == [None] * 64
    assert sum(b is not None for b in tb) == tok.get_vocab_size() - len(SPECIAL_TOKENS)
    text = 'Hello {"key": [1, 2.5]} – é\n'
    ids = tok.encode(text).ids
    assert b"".join(tb[i] for i in ids) == text.encode()


def test_sentencepiece_pieces_and_byte_fallback():
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x0A>": 3, "<0xC3>": 4, "<0xA9>": 5,
             "\u2581": 6, "\u2581{": 7, '"': 8, "a": 9, "}": 10, ":": 11, "1": 12}
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                           normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = pre_tokenizers.Split("\u2581", "merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<s>", "</s>"])
    tb = token_bytes(tok, 14)
    assert tb[:8] == [b"<unk>", None, None, b"\n", b"\xc3", b"\xa9", b" ", b" {"]
    assert tb[13] is None  # past the tokenizer


def synthetic_vocab(n: int, seed: int) -> list[bytes | None]:
    """Words with and without a leading space, runs of JSON's punctuation, digits and
    whitespace, raw high bytes, repeats and holes: what a real vocabulary mixes."""
    rng = random.Random(seed)
    punct = ' \n\t{}[]:,."\\0123456789-+eE'
    out: list[bytes | None] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.02:
            out.append(None)
        elif r < 0.4:
            word = "".join(rng.choice("abtrufalsn") for _ in range(rng.randint(1, 5)))
            out.append((" " + word).encode())
        elif r < 0.8:
            out.append("".join(rng.choice(punct) for _ in range(rng.randint(1, 4))).encode())
        elif r < 0.9:
            out.append(rng.choice([b"true", b"false", b"null", b'":', b'",', b'"}', b"\\u00"]))
        else:
            out.append(bytes(rng.randint(0x80, 0xFF) for _ in range(rng.randint(1, 3))))
    return out


def json_mask(vocab: Vocabulary, text: bytes | None) -> np.ndarray:
    """JSON mode's mask after ``text`` (None: off the grammar), unpacked."""
    grammar = vocab.grammar("json")
    auto = grammar.automaton
    state = None if text is None else jg.advance(auto.start, text, auto.step)
    return allowed_of(vocab.mask(grammar, state), vocab.size)


def test_json_masks_equal_trying_every_token():
    tokens = synthetic_vocab(3000, 0)
    eos = [len(tokens) - 1]
    tokens[-1] = None
    vocab = Vocabulary(tokens, eos)
    auto = vocab.grammar("json").automaton
    docs = ['{"ab": [1, -2.5e3, true, null, "x\\u00e9y", {"k": {}}], "c": "d"} ', "{}",
            '{\n' + " " * 31 + '"a": "' + " " * 40 + '"}']
    checked = 0
    for doc in docs:
        data = doc.encode()
        for i in range(len(data) + 1):
            state = jg.advance(auto.start, data[:i], auto.step)
            got = json_mask(vocab, data[:i])
            want = np.array([b is not None and jg.advance(state, b, auto.step) is not None
                             for b in tokens])
            want[eos] = auto.complete(state)
            assert (got == want).all(), (data[:i], np.flatnonzero(got != want)[:5])
            checked += 1
    assert checked > 60
    assert json_mask(vocab, None).nonzero()[0].tolist() == eos


def test_whitespace_between_tokens_comes_in_bounded_runs():
    """A run of WHITESPACE_RUN bytes between two tokens, then the next token must come;
    inside a string whitespace is text, unbounded."""
    auto = Vocabulary([b"{"], []).grammar("json").automaton
    def ok(text: str) -> bool:
        return jg.advance(auto.start, text.encode(), auto.step) is not None
    run = " " * WHITESPACE_RUN
    assert ok("{" + run + '"a"' + run + ":" + run + "1" + run + "}" + run)
    assert not ok("{" + run + " ") and not ok('{"a":' + run + "\n")
    assert not ok("{}" + run + "\t")
    assert ok('{"a": "' + run * 3 + '"}')
    # text a schema holds (a pattern's, a length-bound string's, an enum's, a free value's
    # string) is not whitespace between tokens either
    schema = {"type": "object", "properties": {
        "p": {"type": "string", "pattern": "[a ]+"}, "n": {"type": "string", "maxLength": 99},
        "e": {"enum": ["x" + run + " y"]}, "f": {}}}
    auto = Vocabulary([b"{"], []).grammar("schema", schema).automaton
    text = ('{"p": "a' + run * 2 + '", "n": "' + run * 2 + '", "e": "x' + run + ' y", '
            '"f": {"k": "' + run * 2 + '"}}')
    assert auto.complete(jg.advance(auto.start, text.encode(), auto.step))
    assert jg.advance(auto.start, ('{"f": {"k":' + run + " ").encode(), auto.step) is None


@pytest.mark.parametrize("kind,spec", [("json", ()), ("schema", {"type": "object"})])
def test_compact_json_has_no_whitespace_between_tokens(kind, spec):
    """vLLM's disable_any_whitespace: none between tokens, strings keep theirs; a grammar of
    its own (the bounded one stays as it was)."""
    vocab = Vocabulary([b"{"], [])
    auto = vocab.grammar(kind, spec, whitespace=0).automaton
    def ok(text: str) -> bool:
        return jg.advance(auto.start, text.encode(), auto.step) is not None
    assert ok('{"a":[1,{"b":" x "}]}') and not ok('{ "a":1}') and not ok('{"a": 1}')
    assert not ok('{"a":1}\n')
    assert vocab.grammar(kind, spec).automaton.limit == WHITESPACE_RUN


def test_guide_follows_outputs_and_ends_only_when_whole():
    tokens = [b"{", b"}", b' "a"', b":", b" 1", b"x", None]
    vocab = Vocabulary(tokens, [6])
    guide = Guide(vocab, "json")
    assert allowed_of(guide.mask([]), 7).tolist() == [True, False, False, False, False, False,
                                                      False]
    assert allowed_of(guide.mask([0]), 7).tolist() == [False, True, True, False, False, False,
                                                       False]
    # after {"a": 1 a number may go on, but not past a space: " 1" is refused
    assert allowed_of(guide.mask([0, 2, 3, 4]), 7).tolist() == [False, True] + [False] * 5
    assert allowed_of(guide.mask([0, 2, 3, 4, 1]), 7).tolist() == [False] * 6 + [True]
    assert guide.read == 5


def test_choices():
    tokens = [b"y", b"ye", b"yes", b"s", b"n", b"no", b"o", b" ", b"may", b"be", b"maybe", None]
    vocab = Vocabulary(tokens, [11])
    guide = Guide(vocab, "choice", ["yes", "no", "maybe so"])
    first = allowed_of(guide.mask([]), 12)
    assert first.nonzero()[0].tolist() == [0, 1, 2, 4, 5, 8, 10]
    assert allowed_of(guide.mask([1]), 12).nonzero()[0].tolist() == [3]  # "ye" -> "s"
    assert allowed_of(guide.mask([1, 3]), 12).nonzero()[0].tolist() == [11]  # whole: EOS
    other = Guide(vocab, "choice", ["yes", "no", "maybe so"])
    assert allowed_of(other.mask([10]), 12).nonzero()[0].tolist() == [7]  # "maybe" -> " "
    assert allowed_of(other.mask([10, 6]), 12).nonzero()[0].tolist() == [11]  # off the choices


@pytest.mark.parametrize("n", [384, 20000])
def test_vocabulary_walk_handles_repeats_and_prefixes(n):
    tokens = synthetic_vocab(n, n)
    tokens[:4] = [b" ", b" ", b"  ", b" t"]  # a token that is another's prefix, and repeats
    vocab = Vocabulary(tokens, [])
    auto = vocab.grammar("json").automaton
    state = jg.advance(auto.start, b'{"a":', auto.step)
    got = json_mask(vocab, b'{"a":')
    want = np.array([b is not None and jg.advance(state, b, auto.step) is not None
                     for b in tokens])
    assert (got == want).all()
    assert got[:4].tolist() == [True, True, True, True]


def test_mask_bench_runs(capsys, monkeypatch):
    from moebius.bench import guided_masks

    monkeypatch.setattr("sys.argv", ["guided_masks", "--vocab", "3000"])
    guided_masks.main()
    out = capsys.readouterr().out
    assert "vocabulary of 3000 tokens" in out and len(out.splitlines()) == 3 + 9 + 6
    monkeypatch.setattr("sys.argv", ["guided_masks", "--engine", "--rounds", "1"])
    guided_masks.main()
    steps = capsys.readouterr().out.split()
    assert steps[2] == "in" and int(steps[3]) == 48  # every row advanced every step
