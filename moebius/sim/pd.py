"""A simulated prefill/decode deployment: a prefill pool, the router with a REAL routing policy
(``moebius.disagg.eldr``: eldr, least_load, round_robin, random) and a decode pool. Every
instance runs the engine's real ``Scheduler`` with time from the cost model; each decode step
is priced by the distinct experts its batch's tokens actually pick (``moebius.sim.
expert_traces``), not by the uniform-routing expectation.

A request's life, as in docs/disagg.md: arrival -> a prefill instance (round robin over the
pool, as the router picks them) runs the prompt and samples the first token (``Simulator``,
one output token) -> the KV crosses the link -> the router asks the policy for a decode
instance, with the prompt's per-layer top-k counts and its count of in-flight decode requests
per instance at that moment -> the decode instance admits it between two steps
(``Scheduler.admit_prefilled``, as ``DecodeEngine``) and decodes it to the end. The client's
first token leaves with the step that admits it (``DecodeEngine`` streams it then).

Prefill does not depend on the decode policy, so one prefill run serves every policy.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

import numpy as np

from moebius.config import EngineConfig, ModelConfig
from moebius.core import Request, SamplingParams
from moebius.disagg.eldr import RoutingPolicy
from moebius.engine.messages import SampledToken
from moebius.engine.scheduler import Scheduler
from moebius.sim.cost_model import CostModel, RankWork
from moebius.sim.expert_traces import ExpertRequests
from moebius.sim.simulator import Simulator, kv_blocks
from moebius.sim.workloads import Arrival


@dataclass
class Handoff:
    """A request whose prefill is done: it reaches the router at ``time``."""

    index: int  # into the ExpertRequests and the arrivals
    arrival: float
    time: float  # prefill's first token + KV transfer


def prefill_pool(
    model: ModelConfig,
    cm: CostModel,
    arrivals: list[Arrival],
    num_prefill: int,
    link_bytes_per_s: float,
) -> list[Handoff]:
    """Run the prefill pool (round robin over ``num_prefill`` instances, one output token
    each); returns the handoffs in time order. KV moves over a link of ``link_bytes_per_s``."""
    kv_bytes = model.num_layers * model.kv_planes * model.num_kv_heads * model.head_dim * cm.e
    out = []
    for w in range(num_prefill):
        mine = list(range(w, len(arrivals), num_prefill))  # arrivals are in time order
        sim = Simulator(model, 1, cm, layout="tp")
        res = sim.run([Arrival(arrivals[i].time, arrivals[i].prompt_len, 1) for i in mine])
        for j, i in enumerate(mine):
            t = (
                res.first_token_times[f"r{j}"]
                + arrivals[i].prompt_len * kv_bytes / link_bytes_per_s
            )
            out.append(Handoff(i, arrivals[i].time, t))
    return sorted(out, key=lambda h: (h.time, h.index))


class DecodeInstance:
    """One decode instance: the real scheduler, a clock, and the picks of its requests."""

    def __init__(
        self, model: ModelConfig, cm: CostModel, reqs: ExpertRequests, max_num_seqs: int
    ) -> None:
        cfg = EngineConfig(
            model=model,
            max_num_seqs=max_num_seqs,
            enable_prefix_caching=False,
            max_model_len=None,
        )
        self.scheduler = Scheduler(cfg, kv_blocks(cm, cfg.block_size))
        self.cm, self.reqs = cm, reqs
        self.clock = 0.0
        self.to_admit: deque[Request] = deque()
        self.picks: dict[str, np.ndarray] = {}
        self.routed = 0
        self.finish_times: list[float] = []  # nondecreasing: the clock only moves forward
        self.admitted: dict[str, float] = {}  # request -> start of its first step here
        self.first_out: dict[str, float] = {}  # request -> end of that step (TTFT)
        self.done: dict[str, float] = {}
        self.steps: list[tuple[float, int, float]] = []  # (start, batch, distinct per layer)

    def in_flight(self, t: float) -> int:
        """Requests routed here and not finished by time ``t`` (the router's count)."""
        return self.routed - bisect.bisect_right(self.finish_times, t)

    def add(self, req: Request, t: float) -> None:
        if not self.has_work():
            self.clock = max(self.clock, t)
        self.to_admit.append(req)
        self.routed += 1

    def has_work(self) -> bool:
        return bool(self.to_admit) or self.scheduler.has_work()

    def advance_to(self, t: float) -> None:
        """Run every step that starts before ``t``."""
        while self.has_work() and self.clock < t:
            self.step()

    def step(self) -> None:
        s, start = self.scheduler, self.clock
        fresh = []
        while self.to_admit and s.admit_prefilled(self.to_admit[0]):
            req = self.to_admit.popleft()
            self.picks[req.request_id] = self.reqs.decode_picks(int(req.request_id[1:]))
            self.admitted[req.request_id] = start
            fresh.append(req)
            if req.is_finished:  # its first token was its last (max_tokens 1)
                self.first_out[req.request_id] = self.done[req.request_id] = start
                self.finish_times.append(start)
                del self.picks[req.request_id]
        batch = s.schedule()
        if batch.empty:
            if self.to_admit:
                raise RuntimeError("a decode instance admits nothing: the KV pool is too small")
            return
        work = RankWork()
        rows = []
        for req, n in batch.items:
            if n != 1:
                raise RuntimeError("a decode instance preempted (recompute): enlarge its pool")
            rows.append(self.picks[req.request_id][len(req.output_token_ids) - 1])
            work.num_seqs += 1
            work.num_tokens += 1
            work.kv_tokens += req.num_computed_tokens + 1
        picks = np.stack(rows)  # (B, L, k)
        num_layers = picks.shape[1]
        used = np.zeros((num_layers, self.reqs.num_experts), dtype=bool)
        used[np.arange(num_layers)[None, :, None], picks] = True
        work.active_experts = float(used.sum() / num_layers)
        self.clock += self.cm.step_time("tp", [work])
        self.steps.append((start, len(batch.items), work.active_experts))
        for req in fresh:
            self.first_out[req.request_id] = self.clock
        tokens = {r.request_id: SampledToken(r.request_id, 1) for r, _ in batch.items}
        for req in s.update(batch, tokens):
            if req.is_finished:
                self.done[req.request_id] = self.clock
                self.finish_times.append(self.clock)
                del self.picks[req.request_id]


def decode_pool(
    model: ModelConfig,
    cm: CostModel,
    reqs: ExpertRequests,
    handoffs: list[Handoff],
    policy: RoutingPolicy,
    num_decode: int,
    max_num_seqs: int = 256,
) -> tuple[list[DecodeInstance], list[tuple[float, list[int], int]]]:
    """Route every handoff with ``policy`` and decode it; returns the instances and the
    router's decisions (time, in-flight loads seen, chosen instance)."""
    pool = [DecodeInstance(model, cm, reqs, max_num_seqs) for _ in range(num_decode)]
    decisions = []
    for h in handoffs:
        for inst in pool:
            inst.advance_to(h.time)
        loads = [inst.in_flight(h.time) for inst in pool]
        k = policy.choose(reqs.prefill_counts[h.index].astype(np.float64), loads)
        decisions.append((h.time, loads, k))
        out_len = int(reqs.output_lens[h.index])
        params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
        req = Request(f"r{h.index}", [1] * int(reqs.prompt_lens[h.index]), params, seed=h.index)
        req.output_token_ids.append(1)  # the prefill's first token
        pool[k].add(req, h.time)
    for inst in pool:
        inst.advance_to(float("inf"))
    return pool, decisions
