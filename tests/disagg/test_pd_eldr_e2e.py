"""ELDR through the real router, end to end on CPU: a topic-locality tiny checkpoint
(`moebius make-tiny --topics 2`), centroids from `moebius eldr calibrate` on prompts of both
topics, a router with `--policy eldr` in front of 1 prefill and 2 decode processes.

Checks: outputs equal a single instance's; each prompt goes to the decode instance that ELDR's
rule names (similarity to the centroids computed here from the same checkpoint; load from the
router's in-flight counts), so one topic's prompts share an instance; a prompt whose
similarities are within tau of each other goes to the less loaded instance, one that is
clearly closer to a loaded instance's centroid still goes there.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from tokenizers import Tokenizer

from moebius.core import SamplingParams
from moebius.disagg.calibrate import record_prompts
from moebius.disagg.eldr import EldrModel
from moebius.llm import LLM
from tests.disagg.pd_cluster import body, run_cluster, stream

TAU = 0.1
MAX_TOKENS = 16
HOLD_TOKENS = 1500  # a stream that stays in flight until the test leaves it


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "moebius.cli", *args], check=True, capture_output=True)


def _topic_prompt(rng: random.Random, words: dict, topics: list[int]) -> str:
    return " " + " ".join(rng.choice(words[t]) for t in topics)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Checkpoint, calibration, prompts of known topics and the ELDR model."""
    root = tmp_path_factory.mktemp("eldr_e2e")
    model_dir = str(root / "topics2")
    _cli("make-tiny", model_dir, "--topics", "2", "--seed", "3")
    # Whole words the tokenizer keeps as one token: their topic is the token id mod 2.
    vocab = Tokenizer.from_file(model_dir + "/tokenizer.json").get_vocab()
    words = {
        t: sorted(
            w[1:] for w, i in vocab.items() if w[:1] == "Ġ" and w[2:].isalpha() and i % 2 == t
        )
        for t in (0, 1)
    }
    rng = random.Random(0)
    calib = [_topic_prompt(rng, words, [i % 2] * 12) for i in range(16)]
    (root / "calib.txt").write_text("\n".join(calib) + "\n")
    eldr = str(root / "eldr.npz")
    _cli(
        "eldr", "calibrate", "--model", model_dir, "--prompts", str(root / "calib.txt"),
        "--workers", "2", "--max-tokens", "8", "--out", eldr,
    )  # fmt: skip
    prompts = {
        "pure": [_topic_prompt(rng, words, [t] * 10) for t in (0, 1, 1, 0, 0, 1)],
        "mixed": _topic_prompt(rng, words, [0, 1] * 6),  # as close to both centroids
        "leaning0": _topic_prompt(rng, words, [0, 0, 1] * 4),  # closer to topic 0's
        "hold": [_topic_prompt(rng, words, [t] * 10) for t in (0, 1)],
    }
    tokenizer = Tokenizer.from_file(model_dir + "/tokenizer.json")
    for p, t in zip(prompts["pure"], (0, 1, 1, 0, 0, 1), strict=True):
        assert {i % 2 for i in tokenizer.encode(p).ids} == {t}, p
    every = prompts["pure"] + [prompts["mixed"], prompts["leaning0"]] + prompts["hold"]
    counts, _ = record_prompts(model_dir, every, max_tokens=1)
    model = EldrModel.load(eldr)
    sims = {p: model.centroids @ model.signature(c) for p, c in zip(every, counts, strict=True)}
    with LLM(model_dir, device="cpu") as llm:
        outs = llm.generate(every, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    reference = {p: o.outputs[0].text for p, o in zip(every, outs, strict=True)}
    return {"model": model_dir, "eldr": eldr, "prompts": prompts, "sims": sims, "ref": reference}


@pytest.fixture(scope="module")
def cluster(setup, tmp_path_factory):
    logs = tmp_path_factory.mktemp("pd_eldr_logs")
    args = ["--policy", "eldr", "--eldr-model", setup["eldr"], "--tau", str(TAU)]
    with run_cluster(setup["model"], args, logs) as c:
        yield c


def _eldr_rule(sims: np.ndarray, loads: list[int]) -> int:
    """ELDR's online rule, written out: among the workers within TAU of the best similarity,
    the fewest in flight, ties to the lowest index."""
    candidates = [k for k in range(len(sims)) if sims[k] >= sims.max() - TAU]
    return min(candidates, key=lambda k: (loads[k], k))


def _loads(url: str) -> list[int]:
    return [d["in_flight"] for d in httpx.get(url + "/router/state").json()["decode"]]


def _settled_loads(url: str, want: list[int], timeout: float = 30.0) -> list[int]:
    """The router's in-flight counts once they equal ``want`` (a finished response releases
    its slot just after its last byte) or the timeout passes."""
    deadline = time.monotonic() + timeout
    while (got := _loads(url)) != want and time.monotonic() < deadline:
        time.sleep(0.02)
    return got


def _complete(cluster, setup, prompt: str) -> str:
    """One non-streamed completion through the router; checks the text; returns the instance."""
    req = body(cluster["model"], prompt, False, MAX_TOKENS)
    r = httpx.post(cluster["url"] + "/v1/completions", json=req, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == setup["ref"][prompt]
    return r.headers["x-moebius-decode-instance"]


def _routed(url: str) -> dict[str, float]:
    """moebius:router_routed_total per decode instance."""
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("moebius:router_routed_total{"):
            out[line.split('"')[1]] = float(line.split()[-1])
    return out


def test_topics_share_a_decode_instance(cluster, setup):
    urls, sims = cluster["decode_urls"], setup["sims"]
    before = _routed(cluster["url"])
    by_topic: dict[int, set[str]] = {0: set(), 1: set()}
    for prompt, topic in zip(setup["prompts"]["pure"], (0, 1, 1, 0, 0, 1), strict=True):
        assert _settled_loads(cluster["url"], [0, 0]) == [0, 0]
        got = _complete(cluster, setup, prompt)
        assert got == urls[_eldr_rule(sims[prompt], [0, 0])], prompt
        by_topic[topic].add(got)
    # one instance per topic, and not the same one (round robin and least-load fail this)
    assert len(by_topic[0]) == 1 and len(by_topic[1]) == 1 and by_topic[0] != by_topic[1]
    after = _routed(cluster["url"])
    assert {u: after[u] - before.get(u, 0.0) for u in urls} == {u: 3.0 for u in urls}


def _hold(cluster, prompt: str):
    """Start a long stream of ``prompt``; return (record, stop event, thread) once it is
    decoding (its instance then counts one request in flight)."""
    record, stop = {}, threading.Event()
    req = body(cluster["model"], prompt, True, HOLD_TOKENS, ignore_eos=True)
    t = threading.Thread(target=stream, args=(cluster["url"], req, record, stop))
    t.start()
    deadline = time.monotonic() + 60
    while not record.get("chunks") and time.monotonic() < deadline:
        assert t.is_alive() or record.get("chunks"), record
        time.sleep(0.01)
    assert record["chunks"] and record["error"] is None, record
    return record, stop, t


def _release(cluster, hold) -> None:
    record, stop, t = hold
    stop.set()
    t.join()
    assert _settled_loads(cluster["url"], [0, 0]) == [0, 0]  # released when the client left


@pytest.mark.parametrize("held_topic", [0, 1])
def test_load_breaks_ties_within_tau_only(cluster, setup, held_topic):
    urls, sims, prompts = cluster["decode_urls"], setup["sims"], setup["prompts"]
    holder = prompts["hold"][held_topic]
    mixed, leaning = prompts["mixed"], prompts["leaning0"]
    # preconditions of the checkpoint and calibration, so a failure below is the router's
    assert abs(sims[mixed][0] - sims[mixed][1]) < TAU / 2, sims[mixed]
    assert abs(sims[holder][0] - sims[holder][1]) > 2 * TAU, sims[holder]
    assert abs(sims[leaning][0] - sims[leaning][1]) > TAU, sims[leaning]
    hold = _hold(cluster, holder)
    try:
        busy = urls.index(hold[0]["instance"])
        assert busy == _eldr_rule(sims[holder], [0, 0])
        loads = _settled_loads(cluster["url"], [int(k == busy) for k in range(2)])
        assert loads == [int(k == busy) for k in range(2)]
        got = _complete(cluster, setup, mixed)  # within tau of both: the idle instance
        assert got == urls[_eldr_rule(sims[mixed], loads)] == urls[1 - busy]
        for prompt in prompts["pure"][:2] + [leaning]:  # beyond tau: locality, load or not
            assert _settled_loads(cluster["url"], loads) == loads
            got = _complete(cluster, setup, prompt)
            assert (
                got
                == urls[_eldr_rule(sims[prompt], loads)]
                == urls[_eldr_rule(sims[prompt], [0, 0])]
            )
        assert hold[2].is_alive() and hold[0]["error"] is None  # in flight all along
    finally:
        _release(cluster, hold)
