"""The simulator: it drives the engine's real Scheduler, conserves requests through switches
and preemptions, its cost model is monotonic, the bundled profile reproduces the measured H200
figures, and runs are deterministic by seed. CPU only, a few seconds."""

from __future__ import annotations

import pytest

from moebius.config import preset
from moebius.engine.policy import AutoPolicy, SwitchPolicy
from moebius.engine.scheduler import Scheduler
from moebius.sim.calibrate import FITTED, fit_profile, nnls
from moebius.sim.cost_model import CostModel, Link, Profile
from moebius.sim.figures import ALL
from moebius.sim.simulator import CostProfile, Simulator
from moebius.sim.validate import table
from moebius.sim.workloads import Arrival, poisson, rollout

MODEL = preset("qwen3-30b-a3b", num_hidden_layers=4)
BLOCKS = {"ep": 200, "tp": 400}  # small pools: block managers are lists, rebuilt at switches


class EveryK(SwitchPolicy):
    """Flips the layout every ``k`` decisions: exercises plan_switch under load."""

    def __init__(self, k: int) -> None:
        self.k, self.calls = k, 0

    def decide(self, snap):
        self.calls += 1
        if self.calls % self.k == 0:
            return "ep" if snap.layout == "tp" else "tp"
        return None


@pytest.fixture(scope="module")
def profile() -> Profile:
    return Profile.load("h200")


def test_drives_the_real_scheduler(profile, monkeypatch):
    calls = {"schedule": 0, "update": 0, "plan_switch": 0}
    for name in calls:
        real = getattr(Scheduler, name)

        def wrapped(self, *a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(self, *a, **kw)

        monkeypatch.setattr(Scheduler, name, wrapped)
    sim = Simulator(MODEL, 2, CostModel(MODEL, 2, profile), policy=EveryK(5), num_blocks=BLOCKS)
    assert type(sim.scheduler) is Scheduler
    res = sim.run(rollout(8, prompt_len=40, mean_output=30, max_output=60, seed=1))
    assert calls["schedule"] == res.steps and calls["update"] == res.steps
    assert calls["plan_switch"] == len(res.switches) > 0


@pytest.mark.parametrize("ranks,layout", [(1, "tp"), (2, "tp"), (2, "ep"), (4, "ep")])
def test_every_request_finishes_with_its_length(profile, ranks, layout):
    arr = poisson(30, rate=200.0, prompt_len=48, mean_output=40, seed=3)
    policy = EveryK(7) if ranks > 1 else None
    # a small pool forces preemptions (and preemptions at switches into TP)
    sim = Simulator(
        MODEL,
        ranks,
        CostModel(MODEL, ranks, profile),
        layout=layout,
        policy=policy,
        num_blocks={"ep": 40, "tp": 40 * ranks // min(ranks, 4)},
        max_num_batched_tokens=256,
    )
    res = sim.run(arr)
    assert len(res.finished) == len(arr)
    assert sorted(res.finished.values()) == sorted(a.output_len for a in arr)
    assert res.output_tokens == sum(a.output_len for a in arr)
    if ranks > 1:
        assert res.switches
    assert res.makespan > max(a.time for a in arr)


def test_auto_policy_runs_on_the_cost_model(profile):
    m = preset("qwen3-235b-a22b", num_hidden_layers=8)
    cm = CostModel(m, 8, profile)
    arr = rollout(64, prompt_len=64, mean_output=200, max_output=800, seed=0)
    sim = Simulator(
        m,
        8,
        cm,
        layout="ep",
        policy=AutoPolicy(CostProfile(cm)),
        num_blocks={"ep": 400, "tp": 1600},
    )
    res = sim.run(arr)
    assert sorted(res.finished.values()) == sorted(a.output_len for a in arr)


def test_cost_model_monotonic(profile):
    for n, layout in [(1, "tp"), (2, "tp"), (2, "ep"), (8, "tp"), (8, "ep"), (32, "ep")]:
        cm = CostModel(preset("qwen3-235b-a22b"), n, profile)
        times = [cm.decode_step_time(layout, b, 1024) for b in (1, 2, 8, 32, 128, 512, 2048)]
        assert times == sorted(times), (n, layout)
        ctx = [cm.decode_step_time(layout, 64, c) for c in (128, 1024, 8192)]
        assert ctx == sorted(ctx)
    cm = CostModel(preset("qwen3-235b-a22b"), 8, profile)
    sw = [cm.switch_time(b) for b in (0, 1e6, 1e9, 1e10)]
    assert sw == sorted(sw) and sw[0] > 0
    slow = CostModel(preset("qwen3-235b-a22b"), 8, profile, coll_link=Link(10e9, 1e-5))
    assert slow.decode_step_time("ep", 256, 1024) > cm.decode_step_time("ep", 256, 1024)


def test_validate_within_stated_error(profile):
    rows = table(profile, leave_one_out=True)
    assert len(rows) == len(ALL) == 41
    assert max(abs(r.error) for r in rows) < 0.10  # in-sample: every figure within 10%
    loo = [abs(r.loo_error) for r in rows]
    assert max(loo) < 0.20 and sum(e < 0.10 for e in loo) >= 39  # as docs/sim.md states


def test_bundled_profile_is_the_fit(profile):
    refit = fit_profile(ALL, base=profile.with_(engine=None, **{k: 0.0 for k in FITTED}))
    for k in FITTED + ["host_step_s", "host_per_seq_s", "eager_layer_s"]:
        assert getattr(refit, k) == pytest.approx(getattr(profile, k), rel=1e-6), k
    assert refit.engine.kv_s_per_byte is profile.engine.kv_s_per_byte is None  # one context
    for k in ("layer_latency_s", "hbm_s_per_byte", "mla_layer_latency_s"):
        assert getattr(refit.engine, k) == pytest.approx(getattr(profile.engine, k), rel=1e-6), k


def test_nnls_nonnegative():
    import numpy as np

    A = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    x = nnls(A, np.array([2.0, -1.0, 1.0]))
    assert (x >= 0).all() and x[1] == 0 and x[0] == pytest.approx(1.5)


def test_deterministic_by_seed(profile):
    def run(seed):
        cm = CostModel(MODEL, 2, profile)
        arr = poisson(20, rate=100.0, prompt_len=32, mean_output=24, seed=seed)
        return Simulator(MODEL, 2, cm, policy=EveryK(6), num_blocks=BLOCKS).run(arr).summary()

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_trace_arrivals_are_honoured(profile):
    arr = [Arrival(0.0, 16, 4), Arrival(10.0, 16, 4)]
    res = Simulator(MODEL, 1, CostModel(MODEL, 1, profile), num_blocks=BLOCKS).run(arr)
    assert res.makespan > 10.0 and len(res.finished) == 2
