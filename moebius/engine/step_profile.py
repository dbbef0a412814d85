"""Decode step-time curves per layout, measured on the actual hardware through real engine
steps, cached to JSON, and interpolated for the switch policy.

A profile is a grid: for each layout, the median seconds of one decode step at each
(context length, batch size) point. ``step_time`` interpolates linearly in log(batch) and in
context, and extrapolates past the largest batch along the last segment's slope (decode cost
grows at most linearly in batch). The file is keyed by everything that changes the curves:
model shapes, ranks, device name, dtype, torch version.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field

log = logging.getLogger("moebius.policy")

DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "moebius", "step_profiles")


@dataclass
class StepProfile:
    """times[layout][i][j]: seconds per decode step at contexts[i] tokens, batches[j] requests.
    ``switch_seconds[direction]`` ("tp->ep") is the measured cost of an empty switch."""

    batches: list[int]
    contexts: list[int]
    times: dict[str, list[list[float]]]
    switch_seconds: dict[str, float] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if sorted(self.batches) != list(self.batches) or not self.batches:
            raise ValueError("profile batches must be a non-empty increasing list")
        if sorted(self.contexts) != list(self.contexts) or not self.contexts:
            raise ValueError("profile contexts must be a non-empty increasing list")
        for layout, grid in self.times.items():
            if len(grid) != len(self.contexts) or any(len(r) != len(self.batches) for r in grid):
                raise ValueError(f"profile grid for {layout!r} has the wrong shape")

    @property
    def layouts(self) -> list[str]:
        return sorted(self.times)

    # ------------------------------------------------------------------ interpolation
    def _in_batch(self, row: list[float], batch: float) -> float:
        bs = self.batches
        if batch <= 0:
            return 0.0
        if len(bs) == 1:
            return row[0] * max(1.0, batch / bs[0])
        if batch <= bs[0]:
            return row[0]
        if batch >= bs[-1]:  # linear in batch past the last point, never decreasing
            slope = max(0.0, (row[-1] - row[-2]) / (bs[-1] - bs[-2]))
            return row[-1] + slope * (batch - bs[-1])
        j = bisect.bisect_right(bs, batch) - 1
        w = (math.log(batch) - math.log(bs[j])) / (math.log(bs[j + 1]) - math.log(bs[j]))
        return row[j] * (1 - w) + row[j + 1] * w

    def step_time(self, layout: str, batch: float, context: float | None = None) -> float:
        """Predicted seconds of one decode step; 0 for an empty batch."""
        grid = self.times[layout]
        cs = self.contexts
        if context is None:
            context = cs[len(cs) // 2]
        if len(cs) == 1 or context <= cs[0]:
            return self._in_batch(grid[0], batch)
        if context >= cs[-1]:
            return self._in_batch(grid[-1], batch)
        i = bisect.bisect_right(cs, context) - 1
        w = (context - cs[i]) / (cs[i + 1] - cs[i])
        return self._in_batch(grid[i], batch) * (1 - w) + self._in_batch(grid[i + 1], batch) * w

    def crossover(self, context: float | None = None, upto: int = 1 << 14) -> int | None:
        """The smallest batch at which EP is predicted faster than TP, if any."""
        for b in range(1, upto + 1):
            if self.step_time("ep", b, context) < self.step_time("tp", b, context):
                return b
        return None

    # ------------------------------------------------------------------ building, files
    @classmethod
    def synthetic(cls, fn, batches=DEFAULT_BATCHES, contexts=(512,), **kw) -> StepProfile:
        """From ``fn(layout, batch, context) -> seconds``: for tests and the simulator."""
        times = {lay: [[fn(lay, b, c) for b in batches] for c in contexts] for lay in ("tp", "ep")}
        return cls(list(batches), list(contexts), times, **kw)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> StepProfile:
        return cls(
            d["batches"], d["contexts"], d["times"], d.get("switch_seconds", {}), d.get("meta", {})
        )

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)

    @classmethod
    def load(cls, path: str) -> StepProfile:
        with open(path) as f:
            return cls.from_json(json.load(f))


def profile_key(cfg) -> str:
    """A file name that changes whenever the step-time curves could."""
    import torch

    device = cfg.device
    if device == "cuda" and torch.cuda.is_available():
        device = torch.cuda.get_device_name().replace(" ", "_")
    blob = json.dumps(
        [
            asdict(cfg.model),
            cfg.ranks,
            device,
            cfg.dtype,
            cfg.block_size,
            cfg.enforce_eager,
            torch.__version__,
        ],
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return f"{cfg.model.architecture}-L{cfg.model.num_layers}-r{cfg.ranks}-{device}-{digest}"


def prefill_all(engine) -> None:
    """Step until nothing waits and every running request has computed its prompt."""
    s = engine.scheduler
    while s.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in s.running):
        engine.step()


def abort_all(engine) -> None:
    """Abort every request and step until the engine is idle."""
    for rid in list(engine.groups):
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()


def _time_batch(
    engine, batch: int, context: int, steps: int, warmup: int, rng: random.Random
) -> float | None:
    from moebius.core import SamplingParams

    cap = min(engine.scheduler.num_blocks.values()) * engine.cfg.block_size
    prefill_steps = batch * context // engine.cfg.max_num_batched_tokens + 1
    if batch > engine.cfg.max_num_seqs or batch * (context + prefill_steps + warmup + steps) > cap:
        return None  # does not fit this engine's KV pool or batch limit
    # Requests prefilled early decode while later ones prefill (a large batch takes many
    # prefill steps): they ask for more tokens than are timed and are aborted afterwards, so
    # every timed step runs the whole batch.
    params = SamplingParams(temperature=0, max_tokens=1 << 20, ignore_eos=True)
    vocab = engine.cfg.model.vocab_size
    for _ in range(batch):
        engine.add_request([rng.randrange(vocab) for _ in range(context)], params)
    prefill_all(engine)
    for _ in range(warmup):
        engine.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    abort_all(engine)
    times.sort()
    return times[len(times) // 2]


def from_sweep(rows: list[dict], context: int, switch_seconds: dict | None = None,
               meta: dict | None = None) -> StepProfile:
    """A profile from measured (layout, batch, step_ms) rows (``moebius.bench.multirank``),
    the batches both layouts measured."""
    by = {(r["layout"], r["batch"]): r["step_ms"] / 1e3 for r in rows}
    batches = sorted({b for (lay, b) in by if lay == "tp"} & {b for (lay, b) in by if lay == "ep"})
    times = {lay: [[by[(lay, b)] for b in batches]] for lay in ("tp", "ep")}
    return StepProfile(batches, [context], times, dict(switch_seconds or {}), dict(meta or {}))


def measure(
    engine, batches=DEFAULT_BATCHES, contexts=(512,), steps: int = 8, warmup: int = 2, seed: int = 0
) -> StepProfile:
    """Time real decode steps of ``engine`` in each layout (its policy is held off meanwhile).
    Points that do not fit the KV pool repeat the last measured value of their row."""
    from moebius.engine.policy import ManualPolicy

    if engine.cfg.ranks < 2:
        raise ValueError("profiling layouts needs ranks > 1")
    policy, engine.policy = engine.policy, ManualPolicy()
    start_layout = engine.layout
    rng = random.Random(seed)
    times: dict[str, list[list[float]]] = {}
    switch_seconds: dict[str, float] = {}
    try:
        for layout in ("tp", "ep"):
            if engine.layout != layout:
                n = len(engine.switches)
                engine.switch(layout)
                engine.step()
                rec = engine.switches[n]
                switch_seconds[f"{rec.source}->{rec.target}"] = rec.seconds
            grid = []
            for c in contexts:
                row: list[float] = []
                for b in batches:
                    t = _time_batch(engine, b, c, steps, warmup, rng)
                    row.append(t if t is not None else (row[-1] if row else float("nan")))
                    log.info("profile %s batch %d context %d: %.3f ms", layout, b, c, row[-1] * 1e3)
                grid.append(row)
            times[layout] = grid
        if engine.layout != start_layout:
            n = len(engine.switches)
            engine.switch(start_layout)
            engine.step()
            rec = engine.switches[n]
            switch_seconds[f"{rec.source}->{rec.target}"] = rec.seconds
    finally:
        engine.policy = policy
    meta = {
        "key": profile_key(engine.cfg),
        "steps": steps,
        "created": time.time(),
        "device": engine.cfg.device,
        "ranks": engine.cfg.ranks,
    }
    return StepProfile(list(batches), list(contexts), times, switch_seconds, meta)


def load_or_measure(
    engine, cache_dir: str | None = None, refresh: bool = False, **measure_kw
) -> StepProfile:
    """The cached profile for this engine's model/ranks/device, measuring it on a miss."""
    path = os.path.join(cache_dir or DEFAULT_CACHE_DIR, profile_key(engine.cfg) + ".json")
    if os.path.exists(path) and not refresh:
        prof = StepProfile.load(path)
        want = list(measure_kw.get("batches", prof.batches))
        if all(b in prof.batches for b in want):
            log.info("step profile from %s", path)
            return prof
    t0 = time.perf_counter()
    prof = measure(engine, **measure_kw)
    prof.meta["profile_seconds"] = time.perf_counter() - t0
    prof.save(path)
    log.info("step profile measured in %.1f s, saved to %s", prof.meta["profile_seconds"], path)
    return prof
