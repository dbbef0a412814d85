"""Benchmark workloads as data, reproducible by seed: what arrives when, how long its prompt
is and how many tokens it generates.

- ``bursty``: online serving whose load bursts and subsides: an on/off Poisson process (rate
  ``rate_on`` during exponentially long on-periods, ``rate_off`` between them).
- ``rollout``: RL rollout: ``iterations`` batches of ``num_prompts`` prompts, each batch all at
  once; output lengths lognormal, capped (the long tail keeps a few requests running alone).
- ``steady``: closed loop at a fixed concurrency: a new request replaces each finished one.

Lengths are exact (requests run with ``ignore_eos`` and ``max_tokens = output_len``), so all
layouts do identical work and a run is comparable across layouts. Prompt token ids are drawn
from the request's own seed, so a workload is the same on any engine of the same vocabulary.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class RequestSpec:
    arrival: float  # seconds after the start of its iteration (open loop); 0 for closed loops
    prompt_len: int
    output_len: int
    seed: int

    def prompt_ids(self, vocab_size: int) -> list[int]:
        rng = random.Random(self.seed)
        return [rng.randrange(vocab_size) for _ in range(self.prompt_len)]


@dataclass(frozen=True)
class Workload:
    """``mode``: "open" (requests arrive at their times), "closed" (``concurrency`` in flight).
    ``iterations``: rollout steps, each a list of requests run to completion before the next."""

    name: str
    mode: str
    iterations: list[list[RequestSpec]]
    concurrency: int = 0
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in ("open", "closed"):
            raise ValueError(f"workload mode must be 'open' or 'closed', got {self.mode!r}")
        if self.mode == "closed" and self.concurrency < 1:
            raise ValueError("a closed-loop workload needs concurrency >= 1")

    @property
    def requests(self) -> list[RequestSpec]:
        return [r for it in self.iterations for r in it]

    @property
    def num_output_tokens(self) -> int:
        return sum(r.output_len for r in self.requests)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Workload:
        its = [[RequestSpec(**r) for r in it] for it in d["iterations"]]
        return cls(d["name"], d["mode"], its, d.get("concurrency", 0), d.get("params", {}))

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f)


def _length(rng: random.Random, mean: float, sigma: float, cap: int) -> int:
    """Lognormal with the given mean (not median), at least 1, at most ``cap``."""
    mu = math.log(max(mean, 1.0)) - sigma * sigma / 2
    return max(1, min(cap, int(round(rng.lognormvariate(mu, sigma)))))


def bursty(
    seed: int = 0,
    duration: float = 60.0,
    rate_on: float = 20.0,
    rate_off: float = 1.0,
    mean_on: float = 5.0,
    mean_off: float = 10.0,
    prompt_mean: float = 256,
    output_mean: float = 128,
    output_cap: int = 1024,
    sigma: float = 0.6,
) -> Workload:
    """On/off Poisson arrivals over ``duration`` seconds; starts in an off period."""
    rng = random.Random(seed)
    t, on, reqs = 0.0, False, []
    period_end = rng.expovariate(1 / mean_off)
    while t < duration:
        rate = rate_on if on else rate_off
        gap = rng.expovariate(rate) if rate > 0 else float("inf")
        if t + gap >= period_end:  # memoryless: restart the clock at the period's end
            t, on = period_end, not on
            period_end = t + rng.expovariate(1 / (mean_on if on else mean_off))
            continue
        t += gap
        if t < duration:
            reqs.append(
                RequestSpec(
                    t,
                    _length(rng, prompt_mean, sigma, 4 * int(prompt_mean)),
                    _length(rng, output_mean, sigma, output_cap),
                    rng.getrandbits(31),
                )
            )
    params = dict(
        seed=seed,
        duration=duration,
        rate_on=rate_on,
        rate_off=rate_off,
        mean_on=mean_on,
        mean_off=mean_off,
        prompt_mean=prompt_mean,
        output_mean=output_mean,
        output_cap=output_cap,
        sigma=sigma,
    )
    return Workload("bursty", "open", [reqs], params=params)


def rollout(
    seed: int = 0,
    num_prompts: int = 2048,
    iterations: int = 1,
    prompt_mean: float = 256,
    output_mean: float = 1024,
    output_cap: int = 8192,
    sigma: float = 1.0,
) -> Workload:
    """``iterations`` RL rollout steps of ``num_prompts`` requests each, all at time 0."""
    rng = random.Random(seed)
    its = [
        [
            RequestSpec(
                0.0,
                _length(rng, prompt_mean, 0.3, 4 * int(prompt_mean)),
                _length(rng, output_mean, sigma, output_cap),
                rng.getrandbits(31),
            )
            for _ in range(num_prompts)
        ]
        for _ in range(iterations)
    ]
    params = dict(
        seed=seed,
        num_prompts=num_prompts,
        iterations=iterations,
        prompt_mean=prompt_mean,
        output_mean=output_mean,
        output_cap=output_cap,
        sigma=sigma,
    )
    return Workload("rollout", "open", its, params=params)


def steady(
    seed: int = 0,
    concurrency: int = 64,
    num_requests: int = 256,
    prompt_mean: float = 256,
    output_mean: float = 256,
    output_cap: int = 2048,
    sigma: float = 0.5,
) -> Workload:
    """A closed loop: ``concurrency`` requests in flight until ``num_requests`` are done."""
    rng = random.Random(seed)
    reqs = [
        RequestSpec(
            0.0,
            _length(rng, prompt_mean, 0.3, 4 * int(prompt_mean)),
            _length(rng, output_mean, sigma, output_cap),
            rng.getrandbits(31),
        )
        for _ in range(num_requests)
    ]
    params = dict(
        seed=seed,
        concurrency=concurrency,
        num_requests=num_requests,
        prompt_mean=prompt_mean,
        output_mean=output_mean,
        output_cap=output_cap,
        sigma=sigma,
    )
    return Workload("steady", "closed", [reqs], concurrency=concurrency, params=params)


WORKLOADS = {"bursty": bursty, "rollout": rollout, "steady": steady}


def make(name: str, **kw) -> Workload:
    """A workload by name; unknown keyword arguments are an error of the generator."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    return WORKLOADS[name](**kw)
