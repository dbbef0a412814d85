"""Host cost of guided decoding's masks: a new JSON state's mask (computed once, then cached)
and a cached one, on a synthetic vocabulary the size of Qwen3's (no checkpoint needed).

    python -m moebius.bench.guided_masks [--vocab 151936]

The vocabulary mixes what real ones hold: words with a leading space (most of a byte-level
BPE vocabulary, and the case JSON's whitespace makes expensive), bare words, runs of JSON's
punctuation and digits, raw high bytes. Figures: docs/guided.md, BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import random
import string
import time

from moebius.guided import json_grammar as jg
from moebius.guided.guide import Vocabulary

STATES = {
    "start": b"",
    "after {": b"{",
    "in a key": b'{"ab',
    "before :": b'{"ab"',
    "a value": b'{"ab":',
    "in a string": b'{"ab":"x',
    "in a number": b'{"ab":12',
    "after a value": b'{"ab":"x"',
    "whole": b"{}",
}


def synthetic(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    letters, punct = string.ascii_letters, ' \n\t{}[]:,."\\0123456789-'
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.55:
            out.append((" " + "".join(rng.choices(letters, k=rng.randint(1, 9)))).encode())
        elif r < 0.8:
            out.append("".join(rng.choices(letters, k=rng.randint(1, 8))).encode())
        elif r < 0.9:
            out.append("".join(rng.choices(punct, k=rng.randint(1, 4))).encode())
        else:
            out.append(bytes(rng.randint(128, 255) for _ in range(rng.randint(1, 3))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=151_936)
    args = ap.parse_args()
    tokens = synthetic(args.vocab)
    t0 = time.perf_counter()
    vocab = Vocabulary(tokens, [args.vocab - 1])
    print(f"vocabulary of {args.vocab} tokens built in {time.perf_counter() - t0:.2f} s")
    grammar = vocab.grammar("json")  # a request's guide holds its grammar
    auto = grammar.automaton
    print(f"{'state':14s} {'new, ms':>8s} {'cached, us':>11s}")
    for name, text in STATES.items():
        state = jg.advance(auto.start, text, auto.step)
        t0 = time.perf_counter()
        vocab.mask(grammar, state)
        new = time.perf_counter() - t0
        t0 = time.perf_counter()
        vocab.mask(grammar, state)
        print(f"{name:14s} {new * 1e3:8.1f} {(time.perf_counter() - t0) * 1e6:11.1f}")


if __name__ == "__main__":
    main()
