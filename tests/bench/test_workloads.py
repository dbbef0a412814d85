"""Workloads: reproducible by seed, JSON round trip, and the shapes they promise (bursts,
long-tailed capped rollout lengths, a closed loop)."""

from __future__ import annotations

import statistics

import pytest

from moebius.bench import workloads as wl


def test_same_seed_same_workload_other_seed_differs():
    for name in wl.WORKLOADS:
        a, b, c = wl.make(name, seed=3), wl.make(name, seed=3), wl.make(name, seed=4)
        assert a == b and a != c
        assert wl.Workload.from_json(a.to_json()) == a
        r = a.requests[0]
        assert r.prompt_ids(1000) == r.prompt_ids(1000) and len(r.prompt_ids(1000)) == r.prompt_len


def test_bursty_arrivals_burst_and_subside():
    w = wl.bursty(seed=0, duration=600, rate_on=20, rate_off=0.5, mean_on=5, mean_off=10)
    times = [r.arrival for r in w.requests]
    assert times == sorted(times) and 0 <= times[0] and times[-1] < 600
    per_second = [0] * 600
    for t in times:
        per_second[int(t)] += 1
    # on/off: many quiet seconds and some busy ones, far from a uniform Poisson's spread
    assert sum(c == 0 for c in per_second) > 200
    assert max(per_second) >= 15
    mean_rate = len(times) / 600
    assert 3 < mean_rate < 10  # about 20 x 5/15 + 0.5 x 10/15


def test_rollout_lengths_long_tailed_and_capped():
    w = wl.rollout(seed=1, num_prompts=4000, output_mean=1024, output_cap=8192, iterations=2)
    assert len(w.iterations) == 2 and all(len(it) == 4000 for it in w.iterations)
    assert all(r.arrival == 0 for r in w.requests)
    lens = [r.output_len for r in w.requests]
    assert max(lens) == 8192 and min(lens) >= 1  # the cap is reached
    assert statistics.median(lens) < statistics.mean(lens)  # long right tail
    assert 700 < statistics.mean(lens) < 1100
    assert w.iterations[0] != w.iterations[1]


def test_steady_is_a_closed_loop():
    w = wl.steady(seed=0, concurrency=32, num_requests=100)
    assert w.mode == "closed" and w.concurrency == 32 and len(w.requests) == 100
    with pytest.raises(ValueError):
        wl.Workload("x", "closed", [[]], concurrency=0)
    with pytest.raises(ValueError):
        wl.make("nope")
