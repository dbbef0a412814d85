"""Event-driven simulation of one engine instance: the REAL scheduler and switch policy, with
time from the cost model instead of a GPU.

Each iteration does what ``LLMEngine.step`` does: admit the arrivals whose time has come, ask
the policy (``decide`` on an ``EngineSnapshot`` stamped with simulated time), switch through
``Scheduler.plan_switch`` (its cost from the cost model: owner-changed expert bytes plus the KV
bytes of the plan's moves), ``Scheduler.schedule()``, price the batch per rank, advance the
clock, fake one sampled token per sampling sequence and ``Scheduler.update()``. Everything
about admission, chunked prefill, preemption and EP owners is the engine's own code.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from moebius.config import EngineConfig, ModelConfig
from moebius.core import Request, SamplingParams
from moebius.engine.messages import SampledToken
from moebius.engine.policy import EngineSnapshot, ManualPolicy, SwitchPolicy
from moebius.engine.scheduler import Scheduler
from moebius.parallel.layout import Layout
from moebius.parallel.reshard import kv_transfers
from moebius.sim.cost_model import CostModel, RankWork
from moebius.sim.workloads import Arrival

GPU_WORKSPACE_BYTES = 4e9  # as engine/sizing.py reserves


class CostProfile:
    """The interface ``AutoPolicy`` prices with, answered by the cost model."""

    def __init__(self, cm: CostModel) -> None:
        self.cm = cm
        t = cm.switch_time()
        self.switch_seconds = {"tp->ep": t, "ep->tp": t}

    def step_time(self, layout: str, batch: float, context: float) -> float:
        return self.cm.decode_step_time(layout, max(int(round(batch)), 1), int(context))


@dataclass
class SwitchEvent:
    """Duck-types ``SwitchRecord`` for ``policy.observe_switch``."""

    step: int
    source: str
    target: str
    running: int
    preempted: int
    kv_bytes: int
    seconds: float
    time: float
    phases: dict = field(default_factory=dict)


@dataclass
class SimResult:
    makespan: float
    output_tokens: int
    steps: int
    steps_by_layout: dict
    seconds_by_layout: dict
    switches: list[SwitchEvent]
    preemptions: int
    ttft: list[float]
    tpot: list[float]
    finished: dict  # request id -> output tokens produced
    first_token_times: dict = field(default_factory=dict)  # request id -> simulated time

    @property
    def throughput(self) -> float:
        return self.output_tokens / self.makespan if self.makespan else 0.0

    def summary(self) -> dict:
        def pct(xs: list[float], q: float) -> float:
            return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0

        return {
            "makespan_s": self.makespan,
            "output_tok_per_s": self.throughput,
            "steps": self.steps,
            "switches": len(self.switches),
            "switch_s": sum(s.seconds for s in self.switches),
            "preemptions": self.preemptions,
            "seconds_by_layout": self.seconds_by_layout,
            "ttft_p50_s": pct(self.ttft, 0.5),
            "ttft_p99_s": pct(self.ttft, 0.99),
            "tpot_mean_ms": 1e3 * statistics.fmean(self.tpot) if self.tpot else 0.0,
        }


def kv_blocks(
    cm: CostModel, block_size: int, utilization: float = 0.9, cap_tokens: int = 1 << 20
) -> dict[str, int]:
    """Blocks per block manager of each layout, from the memory left after weights; at most
    ``cap_tokens`` a rank (block managers are lists: a small model would get millions)."""
    m, n = cm.m, cm.n
    free = cm.p.gpu_memory_bytes * utilization - cm.memory_bytes()["ours"] - GPU_WORKSPACE_BYTES
    per_block = m.num_layers * m.kv_planes * block_size * m.num_kv_heads * m.head_dim * cm.e
    nb_ep = max(min(int(free // per_block), cap_tokens // block_size), 1)
    kvh_tp = Layout("tp", 0, n).num_local_kv_heads(m)
    return {"ep": nb_ep, "tp": nb_ep * m.num_kv_heads // kvh_tp}


class Simulator:
    def __init__(
        self,
        model: ModelConfig,
        ranks: int,
        cm: CostModel,
        layout: str = "tp",
        policy: SwitchPolicy | None = None,
        num_blocks: dict[str, int] | None = None,
        max_num_seqs: int = 1024,
        max_num_batched_tokens: int = 8192,
        block_size: int = 16,
        imported_prefill: bool = False,
    ) -> None:
        """``imported_prefill``: a decode-pool instance, whose prompts' KV arrives from a
        prefill pool: the scheduler still admits them, but their chunks cost no compute."""
        self.model, self.cm = model, cm
        self.cfg = EngineConfig(
            model=model,
            ranks=ranks,
            layout=layout,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=False,
            max_model_len=None,
        )
        self.scheduler = Scheduler(self.cfg, num_blocks or kv_blocks(cm, block_size))
        self.policy = policy or ManualPolicy()
        self.imported_prefill = imported_prefill

    def _works(self, batch) -> list[RankWork]:
        ep = self.scheduler.layout == "ep"
        works = [RankWork() for _ in range(self.cfg.ranks if ep else 1)]
        for req, n in batch.items:
            w = works[req.owner_rank if ep else 0]
            start = req.num_computed_tokens
            sample = start + n == req.num_tokens
            if n == 1 or self.imported_prefill:
                w.num_tokens += 1 if sample else 0
                w.kv_tokens += start + n if sample else 0
            else:
                w.num_tokens += n
                w.attn_pairs += n * (start + (n + 1) // 2)
            w.num_seqs += sample
        return works

    def _switch(self, target: str, step: int, now: float) -> SwitchEvent:
        s = self.scheduler
        source = s.layout
        plan, preempted = s.plan_switch(target)
        m, n = self.model, self.cfg.ranks
        sent = [0] * n
        per_head_token = m.num_layers * m.kv_planes * m.head_dim * self.cm.e
        for move in plan.moves:
            for src, _dst, heads in kv_transfers(m, n, move, target):
                sent[src] += move.num_tokens * len(heads) * per_head_token
        seconds = self.cm.switch_time(max(sent))
        return SwitchEvent(
            step,
            source,
            target,
            len(plan.moves),
            len(preempted),
            sum(sent),
            seconds,
            now,
            {"kv": max(sent) / self.cm.p.p2p.bandwidth},
        )

    def run(self, arrivals: list[Arrival], max_steps: int = 10_000_000) -> SimResult:
        s = self.scheduler
        pending = sorted(arrivals, key=lambda a: a.time)
        i, t, step = 0, 0.0, 0
        reqs: dict[str, Request] = {}
        arrived: dict[str, float] = {}
        first: dict[str, float] = {}
        done: dict[str, float] = {}
        switches: list[SwitchEvent] = []
        by_layout = {"tp": [0, 0.0], "ep": [0, 0.0]}
        while (i < len(pending) or s.has_work()) and step < max_steps:
            while i < len(pending) and pending[i].time <= t:
                a = pending[i]
                rid = f"r{i}"
                params = SamplingParams(temperature=0.0, max_tokens=a.output_len, ignore_eos=True)
                reqs[rid] = Request(rid, [1] * a.prompt_len, params, seed=i, arrival_time=a.time)
                arrived[rid] = a.time
                s.add(reqs[rid])
                i += 1
            if not s.has_work():
                t = pending[i].time
                continue
            if self.cfg.ranks > 1 and not isinstance(self.policy, ManualPolicy):
                target = self.policy.decide(self._snapshot(step, t))
                if target and target != s.layout:
                    ev = self._switch(target, step, t)
                    t += ev.seconds
                    switches.append(ev)
                    self.policy.observe_switch(ev)
            batch = s.schedule()
            if batch.empty:
                if i < len(pending):
                    t = max(t, pending[i].time)
                    continue
                raise RuntimeError("the scheduler admits nothing: a request exceeds the KV pool")
            dt = self.cm.step_time(s.layout, self._works(batch))
            t += dt
            by_layout[s.layout][0] += 1
            by_layout[s.layout][1] += dt
            self.policy.observe_step(s.layout, len(batch.items), dt)
            tokens = {
                r.request_id: SampledToken(r.request_id, 1)
                for r, n in batch.items
                if r.num_computed_tokens + n == r.num_tokens
            }
            for req in s.update(batch, tokens):
                first.setdefault(req.request_id, t)
                if req.is_finished:
                    done[req.request_id] = t
            step += 1
        ttft = [first[r] - arrived[r] for r in first]
        tpot = [
            (done[r] - first[r]) / (len(reqs[r].output_token_ids) - 1)
            for r in done
            if len(reqs[r].output_token_ids) > 1
        ]
        return SimResult(
            makespan=t,
            output_tokens=sum(len(r.output_token_ids) for r in reqs.values()),
            steps=step,
            steps_by_layout={k: v[0] for k, v in by_layout.items()},
            seconds_by_layout={k: v[1] for k, v in by_layout.items()},
            switches=switches,
            preemptions=s.num_preemptions,
            ttft=ttft,
            tpot=tpot,
            finished={r: len(reqs[r].output_token_ids) for r in done},
            first_token_times=first,
        )

    def _snapshot(self, step: int, now: float) -> EngineSnapshot:
        s = self.scheduler
        return EngineSnapshot(
            step=step,
            now=now,
            layout=s.layout,
            num_running=len(s.running),
            num_waiting=len(s.waiting),
            running_tokens=sum(r.num_tokens for r in s.running),
            kv_usage=s.kv_usage(),
            remaining_tokens=[r.params.max_tokens - len(r.output_token_ids) for r in s.running],
        )
