"""Disaggregated serving end to end on CPU: a router, 1 prefill and 2 decode instances as
separate processes, KV moved over gloo. Outputs equal a single instance's greedy output; killing
a decode instance mid-run loses no request that had not started decoding."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from moebius.core import SamplingParams
from moebius.llm import LLM
from tests.disagg.pd_cluster import body, run_cluster
from tests.disagg.pd_cluster import stream as _stream

PROMPTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. A mixture of experts",
    "def add(a, b):",
    "What is the capital of France? Paris is the capital of France. Numbers: 0 1 2 3 4 5 6 7",
    "Once upon a time there was a small language model",
    "Tensor parallelism splits every matrix across devices",
]
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def cluster(qwen_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("pd_logs")
    with run_cluster(qwen_dir, ["--policy", "round_robin"], logs) as c:
        yield c


@pytest.fixture(scope="module")
def reference(qwen_dir):
    llm = LLM(qwen_dir, device="cpu")
    try:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    finally:
        llm.shutdown()
    return [o.outputs[0].text for o in outs]


def _body(model: str, prompt: str, stream: bool) -> dict:
    return body(model, prompt, stream, MAX_TOKENS)


def test_outputs_equal_single_instance(cluster, reference):
    url, model = cluster["url"], cluster["model"]
    r = httpx.post(url + "/v1/completions", json=_body("no-such-model", "Hi", False), timeout=60)
    err = r.json()["error"]  # as a single instance answers it, and the cluster serves on
    assert r.status_code == 404 and err["code"] == "model_not_found" and err["param"] == "model"
    # prompt logprobs: scored by the prefill instance, carried with the KV, answered by the
    # decode instance as a single instance answers them
    scored = {**_body(model, PROMPTS[1], False), "max_tokens": 2, "prompt_logprobs": 1}
    r = httpx.post(url + "/v1/completions", json=scored, timeout=60)
    got = r.json()["choices"][0]["prompt_logprobs"]
    with LLM(cluster["model"], device="cpu") as one:
        want = one.generate([PROMPTS[1]], SamplingParams(max_tokens=1, prompt_logprobs=1)
                            )[0].prompt_logprobs
    assert got[0] is None and len(got) == len(want)
    for g, w in zip(got[1:], want[1:], strict=True):
        assert [int(t) for t in g] == list(w)
        assert all(abs(g[str(t)]["logprob"] - v.logprob) < 1e-4 for t, v in w.items())
    for prompt, want in zip(PROMPTS, reference, strict=True):
        r = httpx.post(url + "/v1/completions", json=_body(model, prompt, False), timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
    records = [{} for _ in PROMPTS]
    threads = [
        threading.Thread(target=_stream, args=(url, _body(model, p, True), rec))
        for p, rec in zip(PROMPTS, records, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [rec["error"] for rec in records] == [None] * len(PROMPTS)
    assert [rec["text"] for rec in records] == reference
    state = httpx.get(url + "/router/state").json()
    assert all(d["in_flight"] == 0 for d in state["decode"])
    metrics = httpx.get(url + "/metrics").text
    assert 'moebius:router_routed_total{instance="' in metrics


def test_decode_instance_dies_mid_run(cluster, reference):
    url, model = cluster["url"], cluster["model"]
    n = 12
    records = [{} for _ in range(n)]
    threads = [
        threading.Thread(
            target=_stream, args=(url, _body(model, PROMPTS[i % len(PROMPTS)], True), records[i])
        )
        for i in range(n)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while sum(1 for r in records if r.get("chunks")) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    cluster["procs"]["d2"].kill()  # SIGKILL: connections drop, nothing drains
    cluster["procs"]["d2"].wait()
    late = [{} for _ in range(6)]  # sent after the death, before any health probe notices
    late_threads = [
        threading.Thread(
            target=_stream, args=(url, _body(model, PROMPTS[i % len(PROMPTS)], True), late[i])
        )
        for i in range(len(late))
    ]
    for t in late_threads:
        t.start()
    for t in threads + late_threads:
        t.join()
    for i, rec in enumerate(records):
        if rec["error"] is not None:
            # only a request already decoding on the dead instance may fail, and clearly
            assert rec["chunks"] > 0, f"request {i} lost before its first token: {rec['error']}"
            assert "decode instance failed" in rec["error"]
        else:
            assert rec["text"] == reference[i % len(PROMPTS)], i
    assert any(rec["error"] is None for rec in records)
    for i, rec in enumerate(late):
        assert rec["error"] is None, rec["error"]
        assert rec["text"] == reference[i % len(PROMPTS)]
    metrics = httpx.get(url + "/metrics").text
    retries = [
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith('moebius:router_retries_total{stage="decode"}')
    ]
    assert retries and retries[0] >= 1  # the late requests that met the dead instance
    state = httpx.get(url + "/router/state").json()
    assert [d["up"] for d in state["decode"]] == [True, False]


def test_guided_outputs_equal_single_instance(cluster, qwen_dir):
    """JSON mode and guided_choice across the handoff: the prefill instance samples the first
    token under the guide, the decode instance's guide reads it with the rest."""
    url, model = cluster["url"], cluster["model"]
    guided = [({"response_format": {"type": "json_object"}}, dict(guided_json_object=True)),
              ({"guided_choice": ["yes", "no", "maybe so"]},
               dict(guided_choice=["yes", "no", "maybe so"]))]
    llm = LLM(qwen_dir, device="cpu")
    try:
        for extra, params in guided:
            for prompt in PROMPTS[:3]:
                want = llm.generate([prompt], SamplingParams(
                    temperature=0, max_tokens=MAX_TOKENS, **params))[0].outputs[0]
                r = httpx.post(url + "/v1/completions",
                               json={**_body(model, prompt, False), **extra}, timeout=120)
                assert r.status_code == 200, r.text
                choice = r.json()["choices"][0]
                assert (choice["text"], choice["finish_reason"]) == (want.text,
                                                                     want.finish_reason)
    finally:
        llm.shutdown()
