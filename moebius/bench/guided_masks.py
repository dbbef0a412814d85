"""Host cost of guided decoding's masks: a new JSON state's mask (computed once, then cached)
and a cached one, on a synthetic vocabulary the size of Qwen3's (no checkpoint needed).

    python -m moebius.bench.guided_masks [--vocab 151936]   # JSON states, then regexes
    python -m moebius.bench.guided_masks --engine [--rounds 3]

The vocabulary mixes what real ones hold: words with a leading space (most of a byte-level
BPE vocabulary, and the case JSON's whitespace makes expensive), bare words, runs of JSON's
punctuation and digits, raw high bytes. ``--engine`` instead runs the tiny random checkpoint
with overlapped steps, 8 JSON-mode requests beside 8 plain ones (48 tokens each, seeded):
the engine steps and tokens/s of the batch, where a guided row's mask follows its launch.
Figures: docs/guided.md, BENCHMARKS.md.
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


# regexes (guided_regex, a schema's pattern or format): a date, a sentence of letters (most of
# a vocabulary goes on: the walk cannot prune), a choice, and a line of anything
REGEXES = {r"\d{4}-\d{2}-\d{2}": ["", "2026-1"], r"[A-Za-z ]{1,40}\.": ["", "Hello wor"],
           r"(yes|no|maybe)": [""], r"[^\n]*": ["ab"]}


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


def engine_steps(rounds: int) -> None:
    """Steps and tokens/s of a mixed guided + plain batch under overlapped steps (CPU)."""
    import tempfile

    from moebius import LLM, SamplingParams
    from moebius.model.tiny import write_tiny_checkpoint

    model_dir = write_tiny_checkpoint(tempfile.mkdtemp(), "qwen3_moe", seed=1)
    params = ([SamplingParams(seed=s, max_tokens=48, guided_json_object=True) for s in range(8)]
              + [SamplingParams(seed=s, max_tokens=48, ignore_eos=True) for s in range(8)])
    with LLM(model_dir, async_scheduling=True) as llm:
        llm.generate(["JSON:"] * 16, params)  # the masks' states cached
        for _ in range(rounds):
            steps, t0 = llm.engine.step_count, time.perf_counter()
            outs = llm.generate(["JSON:"] * 16, params)
            dt = time.perf_counter() - t0
            n = sum(len(c.token_ids) for o in outs for c in o.outputs)
            print(f"{n} tokens in {llm.engine.step_count - steps} steps, {dt:.2f} s, "
                  f"{n / dt:.0f} tok/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--engine", action="store_true", help="a guided batch's engine steps")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.engine:
        return engine_steps(args.rounds)
    tokens = synthetic(args.vocab)
    t0 = time.perf_counter()
    vocab = Vocabulary(tokens, [args.vocab - 1])
    print(f"vocabulary of {args.vocab} tokens built in {time.perf_counter() - t0:.2f} s")
    t0 = time.perf_counter()
    vocab._byte_matrix()  # what a regex's masks read (built at the first)
    print(f"token byte matrix built in {time.perf_counter() - t0:.2f} s")
    print(f"{'state':32s} {'new, ms':>8s} {'cached, us':>11s}")
    cases = [("json", (), name, text) for name, text in STATES.items()]
    cases += [("regex", p, f"{p} after {t!r}", t.encode()) for p, ts in REGEXES.items()
              for t in ts]
    for kind, spec, name, text in cases:
        grammar = vocab.grammar(kind, spec)  # a request's guide holds its grammar
        auto = grammar.automaton
        state = jg.advance(auto.start, text, auto.step)
        t0 = time.perf_counter()
        vocab.mask(grammar, state)
        new = time.perf_counter() - t0
        t0 = time.perf_counter()
        vocab.mask(grammar, state)
        print(f"{name:32s} {new * 1e3:8.1f} {(time.perf_counter() - t0) * 1e6:11.1f}")


if __name__ == "__main__":
    main()
