"""Arrival traces for the simulator: (time, prompt_len, output_len) rows.

Defined here because ``moebius.bench.workloads`` did not exist when the simulator was written;
``load`` also reads any trace a benchmark writes (JSON list of rows, or CSV with a header).
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Arrival:
    time: float  # seconds
    prompt_len: int
    output_len: int


def _lognormal(rng: random.Random, mean: float, sigma: float, lo: int, hi: int) -> int:
    mu = math.log(mean) - sigma**2 / 2
    return int(min(hi, max(lo, rng.lognormvariate(mu, sigma))))


def rollout(
    num: int,
    prompt_len: int = 512,
    mean_output: int = 2048,
    max_output: int = 8192,
    sigma: float = 1.0,
    seed: int = 0,
) -> list[Arrival]:
    """An RL rollout: every prompt at t=0, long-tailed output lengths (lognormal, capped)."""
    rng = random.Random(seed)
    return [
        Arrival(0.0, prompt_len, _lognormal(rng, mean_output, sigma, 16, max_output))
        for _ in range(num)
    ]


def poisson(
    num: int,
    rate: float,
    prompt_len: int = 1024,
    mean_output: int = 256,
    sigma: float = 0.8,
    seed: int = 0,
) -> list[Arrival]:
    """Online traffic: Poisson arrivals at ``rate`` per second."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(num):
        t += rng.expovariate(rate)
        p = _lognormal(rng, prompt_len, 0.5, 16, 8 * prompt_len)
        out.append(Arrival(t, p, _lognormal(rng, mean_output, sigma, 8, 16 * mean_output)))
    return out


def bursty(
    num: int,
    base_rate: float,
    burst_rate: float,
    period: float = 60.0,
    duty: float = 0.25,
    seed: int = 0,
    **kw,
) -> list[Arrival]:
    """Online traffic alternating a quiet rate and bursts (``duty`` of each ``period``)."""
    rng = random.Random(seed)
    t, out = 0.0, []
    base = poisson(num, 1.0, seed=seed + 1, **kw)
    for a in base:
        rate = burst_rate if (t % period) < duty * period else base_rate
        t += rng.expovariate(rate)
        out.append(Arrival(t, a.prompt_len, a.output_len))
    return out


def load(path: str) -> list[Arrival]:
    if path.endswith(".csv"):
        with open(path) as f:
            return [
                Arrival(float(r["time"]), int(r["prompt_len"]), int(r["output_len"]))
                for r in csv.DictReader(f)
            ]
    with open(path) as f:
        rows = json.load(f)
    return [Arrival(*r) if isinstance(r, list) else Arrival(**r) for r in rows]
