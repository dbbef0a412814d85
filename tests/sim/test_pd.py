"""The simulated prefill/decode deployment: decode steps priced by the experts they read (the
cost model reproduces the measured H200 mechanism), the topic model's picks, and routing with
the real policy classes through the real scheduler. CPU only, a few seconds."""

from __future__ import annotations

import numpy as np
import pytest

from moebius.config import preset
from moebius.disagg.eldr import EldrModel, LeastLoadPolicy, make_policy
from moebius.engine.scheduler import Scheduler
from moebius.sim.calibrate import session1_view
from moebius.sim.cost_model import CostModel, Profile, RankWork
from moebius.sim.expert_traces import TopicModel
from moebius.sim.pd import decode_pool, prefill_pool
from moebius.sim.pd_bench import _no_repeats, summarize
from moebius.sim.workloads import poisson

# BENCHMARKS.md, "Expert locality": one H200, Qwen3-30B-A3B shapes, batch 64, CUDA graphs; an
# engine before the fused MoE kernels (not re-measured on the current one yet)
MEASURED_MS = {8: 16.95, 16: 18.33, 32: 20.93, 64: 25.88, 128: 35.39}


def test_cost_model_reproduces_the_measured_mechanism():
    m, prof = preset("qwen3-30b-a3b"), Profile.load("h200")
    works = {d: RankWork(64, 64, 64 * 512, active_experts=d) for d in MEASURED_MS}
    # the profile as it priced that engine (the probe's constants) reproduces the figures
    old = CostModel(m, 1, session1_view(prof))
    for distinct, ms in MEASURED_MS.items():
        assert 1e3 * old.step_time("tp", [works[distinct]]) == pytest.approx(ms, rel=0.05)
    # the current engine's terms: the same mechanism, each expert's bytes at its read rate
    cm = CostModel(m, 1, prof)
    t = {d: cm.step_time("tp", [w]) for d, w in works.items()}
    per_expert = 3 * m.moe_intermediate_size * m.hidden_size * 2 * len(m.moe_layers)
    for d in MEASURED_MS:
        want = (d - 8) * per_expert * prof.engine.hbm_s_per_byte
        assert t[d] - t[8] == pytest.approx(want, rel=1e-9)
    assert t[128] < 1e-3 * MEASURED_MS[128]  # the fused kernels read experts faster
    assert cm.step_time("tp", [RankWork(64, 64, 64 * 512)]) == cm.decode_step_time("tp", 64, 512)


def test_topic_model_picks():
    tm = TopicModel(6, 64, 4, num_topics=3, affinity=0.75, preferred=8, seed=1)
    picks = tm.tokens(np.random.default_rng(0), 2, 500)  # (T, L, k)
    assert picks.shape == (500, 6, 4)
    assert (np.diff(np.sort(picks, -1), axis=-1) > 0).all()  # k distinct experts a token
    inside = np.mean([np.isin(picks[:, l], tm.sets[2, l]).mean() for l in range(6)])
    assert inside == pytest.approx(0.75, abs=0.03)
    counts = tm.prompt_counts(np.random.default_rng(0), 1, 100)
    assert (counts.sum(-1) == 400).all()
    assert tm.locality(26)["within"] > 0.5
    none = TopicModel(6, 64, 4, num_topics=3, affinity=8 / 64, preferred=8).locality(26)
    assert abs(none["within"] - none["across"]) < 0.05  # preferred/E: no locality at all


def test_no_repeats_within_the_window():
    order = _no_repeats(np.arange(50), 400, 30, np.random.default_rng(0))
    assert len(order) == 400
    assert all(len(set(order[i : i + 31])) == 31 for i in range(len(order) - 30))


@pytest.fixture(scope="module")
def small_pd():
    """2 prefill + 4 decode instances, 4 strongly separated topics (one per instance)."""
    m = preset("qwen3-30b-a3b", num_hidden_layers=4)
    cm = CostModel(m, 1, Profile.load("h200"))
    tm = TopicModel(4, m.num_experts, m.top_k, num_topics=4, affinity=0.9, seed=0)
    # 600/s: batches of several requests an instance at the engine's ~1 ms steps (4 layers)
    arr = poisson(240, 600.0, prompt_len=64, mean_output=24, seed=0)
    reqs = tm.requests(np.asarray([a.prompt_len for a in arr]), [a.output_len for a in arr], 1)
    cal = tm.requests(np.full(64, 64), np.full(64, 17), 2)
    model = EldrModel.fit(cal.prefill_counts.astype(float), cal.decode_sets(), 4, seed=0)
    handoffs = prefill_pool(m, cm, arr, 2, cm.p.inter_node.bandwidth)
    return m, cm, reqs, model, handoffs


def test_routing_through_the_real_scheduler_and_policies(small_pd, monkeypatch):
    m, cm, reqs, model, handoffs = small_pd
    admitted, finished = [], {}
    real_admit, real_finish = Scheduler.admit_prefilled, Scheduler.finish

    def admit(self, req):
        ok = real_admit(self, req)
        if ok:
            admitted.append(req.request_id)
        return ok

    def finish(self, req, reason, stop_reason=None):
        finished[req.request_id] = (len(req.output_token_ids), reason)
        return real_finish(self, req, reason, stop_reason)

    monkeypatch.setattr(Scheduler, "admit_prefilled", admit)
    monkeypatch.setattr(Scheduler, "finish", finish)
    results = {}
    for name in ("eldr", "least_load", "round_robin"):
        admitted.clear()
        finished.clear()
        pool, decisions = decode_pool(m, cm, reqs, handoffs, make_policy(name, model=model), 4)
        done = {rid: inst for inst in pool for rid in inst.done}
        assert sorted(admitted) == sorted(done) and len(done) == len(reqs)  # each exactly once
        assert all(not inst.has_work() for inst in pool)
        want = {f"r{i}": (int(n), "length") for i, n in enumerate(reqs.output_lens)}
        assert finished == want  # every request decoded to its full length
        for (_, loads, k), h in zip(decisions, handoffs, strict=True):
            assert f"r{h.index}" in pool[k].done
            if name == "least_load":
                assert k == LeastLoadPolicy().choose(None, loads)
        if name == "round_robin":
            assert [k for _, _, k in decisions] == [i % 4 for i in range(len(decisions))]
        if name == "eldr":  # one topic, one instance: the centroids found the topics
            for z in range(4):
                ks = [
                    k
                    for (_, _, k), h in zip(decisions, handoffs, strict=True)
                    if reqs.topics[h.index] == z
                ]
                assert np.bincount(ks, minlength=4).max() >= 0.8 * len(ks)
        results[name] = summarize(pool, decisions, handoffs, reqs)
    eldr, rr = results["eldr"], results["round_robin"]
    assert eldr["distinct_per_layer"] < 0.8 * rr["distinct_per_layer"]
    assert eldr["tpot_p50_ms"] < rr["tpot_p50_ms"]
