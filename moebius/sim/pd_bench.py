"""`moebius sim pd`: decode-routing policies compared on a simulated prefill/decode deployment
(moebius/sim/pd.py), at the published scale by default (8 prefill, 16 decode instances, one
H200 each, the H200-calibrated cost model).

Owns the workload configurations (synthetic topic locality on Qwen3-30B-A3B shapes; the real
DeepSeek-V2-Lite routing trace on its own shapes), ELDR's calibration for each (the real
``EldrModel.fit``, as `moebius eldr calibrate` does, on requests disjoint from the replayed
ones), the arrival rate that gives a target number of in-flight requests per decode instance,
the steady-state metrics and the tables.

Metrics, over the steady state (``window_requests``: those handed off between the 10th and
90th percentile handoff times; the decode steps starting then): distinct experts per MoE layer
per decode step (mean over every instance's steps), decode batch, TPOT (a request's decode
time over its decode steps) p50/p99, TTFT p50, and max/mean in-flight load at routing time.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from moebius.config import preset
from moebius.disagg.eldr import EldrModel, make_policy
from moebius.disagg.signature import length_buckets
from moebius.sim.cost_model import CostModel, Profile
from moebius.sim.expert_traces import (
    ExpertRequests,
    TopicModel,
    load_trace_prompts,
    trace_locality,
    trace_requests,
)
from moebius.sim.pd import decode_pool, prefill_pool
from moebius.sim.workloads import Arrival, poisson

POLICIES = ("eldr", "eldr_cap", "least_load", "round_robin", "random")  # eldr_cap: load_cap
TRACE = "/work/shared/data/routing-deepseek-v2-lite-puffin-1-1000.npz"
LOCALITY_TOKENS = 26  # locality is measured on prompts of the real trace's median length


@dataclass(frozen=True)
class Workload:
    """One configuration. kind "topics" (TopicModel) or "trace" (the routing log)."""

    name: str
    kind: str = "topics"
    preset: str = "qwen3-30b-a3b"
    topics: int = 16
    affinity: float = 0.4
    preferred: int = 16
    prompt_len: int = 1024  # mean (lognormal); the trace uses its prompts' first halves
    output_len: int = 256  # mean (lognormal)
    batch: int = 32  # target in-flight requests per decode instance
    num: int = 0  # requests; 0: enough for a steady state (4x the decode pool's concurrency)
    calib: int = 512  # calibration requests (topics)


BASE = Workload("topics, base")
SWEEP = (
    BASE,
    replace(BASE, name="topics, no locality", affinity=16 / 128),
    replace(BASE, name="topics, affinity 0.6", affinity=0.6),
    replace(BASE, name="topics, affinity 0.8", affinity=0.8),
    replace(BASE, name="topics, 4 domains", topics=4),
    replace(BASE, name="topics, 64 domains", topics=64),
    replace(BASE, name="topics, short prompts", prompt_len=64),
    replace(BASE, name="topics, batch 8", batch=8),
    replace(BASE, name="topics, batch 64", batch=64),
    Workload("trace, batch 8", kind="trace", preset="deepseek-v2-lite", batch=8),
    Workload("trace, batch 16", kind="trace", preset="deepseek-v2-lite", batch=16),
)


def _cached(reqs: ExpertRequests) -> ExpertRequests:
    """Decode picks made once and kept (every policy replays the same requests)."""
    cache: dict[int, np.ndarray] = {}
    make = reqs.decode_picks

    def picks(i: int) -> np.ndarray:
        if i not in cache:
            cache[i] = make(i).astype(np.uint8 if reqs.num_experts <= 256 else np.int16)
        return cache[i]

    return replace(reqs, decode_picks=picks)


def _no_repeats(pool: np.ndarray, num: int, window: int, rng) -> np.ndarray:
    """``num`` prompts from ``pool`` in seeded passes, none twice within ``window`` picks (a
    repeat in flight would share every expert with itself)."""
    window = min(window, len(pool) - 1)
    queue, out, recent = [], [], set()
    while len(out) < num:
        if len(queue) < window + 1:
            queue += list(rng.permutation(pool))
        k = next(j for j, p in enumerate(queue) if p not in recent)
        out.append(queue.pop(k))
        recent.add(out[-1])
        if len(out) > window:
            recent.discard(out[-1 - window])
    return np.asarray(out)


def build(w: Workload, num_decode: int, rate: float, seed: int, data: str):
    """(arrivals, requests, fitted ELDR model, locality stats) of a workload."""
    m = preset(w.preset)
    num = w.num or max(1500, 4 * w.batch * num_decode)
    arr = poisson(num, rate, w.prompt_len, w.output_len, seed=seed)
    outs = np.asarray([a.output_len for a in arr])
    if w.kind == "topics":
        tm = TopicModel(
            len(m.moe_layers), m.num_experts, m.top_k, w.topics, w.affinity, w.preferred, seed
        )
        reqs = tm.requests(np.asarray([a.prompt_len for a in arr]), outs, seed + 1)
        cal_lens = np.asarray([a.prompt_len for a in poisson(w.calib, 1.0, w.prompt_len)])
        cal = tm.requests(cal_lens, np.full(w.calib, 33), seed + 2)
        model = EldrModel.fit(
            cal.prefill_counts.astype(float), cal.decode_sets(), num_decode, seed=seed
        )
        stats = tm.locality(LOCALITY_TOKENS)
    else:
        prompts, num_experts = load_trace_prompts(data)
        rng = np.random.default_rng(seed)
        perm = rng.permutation(len(prompts))
        cal_idx, ev = perm[: int(0.4 * len(prompts))], perm[int(0.4 * len(prompts)) :]
        order = _no_repeats(ev, num, int(1.25 * w.batch * num_decode), rng)
        reqs = trace_requests([prompts[i] for i in order], num_experts, outs)
        cal = trace_requests([prompts[i] for i in cal_idx], num_experts, np.full(len(cal_idx), 33))
        groups = length_buckets(2 * cal.prompt_lens)
        model = EldrModel.fit(
            cal.prefill_counts.astype(float),
            cal.decode_sets(),
            num_decode,
            seed=seed,
            groups=groups,
        )
        lens = reqs.prompt_lens
        arr = [Arrival(a.time, int(p), a.output_len) for a, p in zip(arr, lens, strict=True)]
        stats = trace_locality(prompts, num_experts)
    return arr, _cached(reqs), model, stats


def summarize(pool, decisions, handoffs, reqs: ExpertRequests) -> dict:
    times = np.asarray([h.time for h in handoffs])
    lo, hi = np.quantile(times, 0.1), np.quantile(times, 0.9)
    steps = [s for inst in pool for s in inst.steps if lo <= s[0] <= hi]
    tpot, ttft = [], []
    for h in handoffs:
        if not lo <= h.time <= hi:
            continue
        rid = f"r{h.index}"
        inst = next(p for p in pool if rid in p.done)
        n = int(reqs.output_lens[h.index]) - 1
        if n > 0:
            tpot.append((inst.done[rid] - inst.admitted[rid]) / n)
        ttft.append(inst.first_out[rid] - h.arrival)
    imb = [max(ld) / np.mean(ld) for t, ld, _ in decisions if lo <= t <= hi and sum(ld) > 0]
    return {
        "distinct_per_layer": float(np.mean([s[2] for s in steps])),
        "batch": float(np.mean([s[1] for s in steps])),
        "tpot_p50_ms": 1e3 * float(np.percentile(tpot, 50)),
        "tpot_p99_ms": 1e3 * float(np.percentile(tpot, 99)),
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "load_max_over_mean": float(np.mean(imb)),
        "window_requests": len(tpot),
    }


def run_workload(
    w: Workload,
    policies=POLICIES,
    *,
    num_prefill: int = 8,
    num_decode: int = 16,
    tau: float = 0.1,
    load_cap: float = 1.25,
    seed: int = 0,
    profile: str = "h200",
    data: str = TRACE,
) -> list[dict]:
    """Every policy on one workload; the arrival rate is tuned (one round robin pilot) so
    round robin keeps about ``w.batch`` requests in flight per decode instance."""
    t0 = time.time()
    m = preset(w.preset)
    cm = CostModel(m, 1, Profile.load(profile))
    context = (w.prompt_len if w.kind == "topics" else 16) + w.output_len // 2
    rate = w.batch * num_decode / (w.output_len * cm.decode_step_time("tp", w.batch, context))
    link = cm.p.inter_node.bandwidth  # prefill and decode instances on different nodes
    arr, reqs, model, stats = build(w, num_decode, rate, seed, data)
    # Pilot: round robin at the estimated rate; the real rate scales arrival times only (the
    # same seeded draws), so requests and calibration stay the same.
    handoffs = prefill_pool(m, cm, arr, num_prefill, link)
    pool, decisions = decode_pool(m, cm, reqs, handoffs, make_policy("round_robin"), num_decode)
    scale = summarize(pool, decisions, handoffs, reqs)["batch"] / w.batch
    rate /= scale
    arr = [Arrival(a.time * scale, a.prompt_len, a.output_len) for a in arr]
    handoffs = prefill_pool(m, cm, arr, num_prefill, link)
    rows = []
    for name in policies:
        cap = load_cap if name == "eldr_cap" else None
        policy = make_policy(
            name.removesuffix("_cap"), model=model, tau=tau, seed=seed, load_cap=cap
        )
        pool, decisions = decode_pool(m, cm, reqs, handoffs, policy, num_decode)
        rows.append({"policy": name, **summarize(pool, decisions, handoffs, reqs)})
    info = {
        **asdict(w),
        "rate_per_s": rate,
        "num_requests": len(arr),
        "eldr_layers": model.layers,
        "eldr_calib_spearman": model.calib_spearman,
        "locality_within": stats["within"],
        "locality_across": stats["across"],
        "seconds": time.time() - t0,
    }
    return [{**info, **r} for r in rows]


def table(rows: list[dict]) -> str:
    """Markdown: per workload and policy, changes against round robin."""
    head = (
        "| workload | locality within / across | policy | distinct experts / layer / step "
        "| vs round robin | batch | TPOT p50 / p99 ms | p50 vs RR | p99 vs RR | TTFT p50 s "
        "| load max/mean |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rr = {r["name"]: r for r in rows if r["policy"] == "round_robin"}

    def pct(r: dict, key: str) -> str:
        b = rr.get(r["name"])
        return f"{100 * (r[key] / b[key] - 1):+.1f}%" if b else "-"

    lines = []
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['locality_within']:.2f} / {r['locality_across']:.2f} "
            f"| {r['policy']} | {r['distinct_per_layer']:.1f} | {pct(r, 'distinct_per_layer')} "
            f"| {r['batch']:.1f} | {r['tpot_p50_ms']:.2f} / {r['tpot_p99_ms']:.2f} "
            f"| {pct(r, 'tpot_p50_ms')} | {pct(r, 'tpot_p99_ms')} | {r['ttft_p50_s']:.3f} "
            f"| {r['load_max_over_mean']:.2f} |"
        )
    return head + "\n".join(lines) + "\n"
