"""AutoPolicy on synthetic step-time curves (crossover at batch 8): no flapping under noise,
switches when the horizon pays for it, not when too short, dwell, pause, the rollout decay
forecast; step-profile interpolation and caching; and one end-to-end run on 2 gloo ranks."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from moebius.engine.policy import (
    AutoConfig,
    AutoPolicy,
    EngineSnapshot,
    ManualPolicy,
    forecast_batches,
)
from moebius.engine.step_profile import StepProfile


def curve(layout: str, batch: int, context: int) -> float:
    """TP cheaper below batch 8, EP above (seconds)."""
    return 0.010 + 0.001 * batch if layout == "tp" else 0.014 + 0.0005 * batch


PROFILE = StepProfile.synthetic(
    curve,
    batches=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    switch_seconds={"tp->ep": 0.02, "ep->tp": 0.02},
)


def record(step: int, source: str, target: str, seconds: float = 0.02):
    return SimpleNamespace(
        step=step,
        source=source,
        target=target,
        seconds=seconds,
        phases={"weights": seconds, "kv": 0.0},
        weight_bytes=0,
        kv_bytes=0,
    )


def simulate(policy, batches, layout="tp", remaining=None, dt=0.01):
    """A fake engine loop: one snapshot per step; switches are applied and observed."""
    switches = []
    for step, b in enumerate(batches):
        rem = remaining(step) if remaining else [None] * b
        snap = EngineSnapshot(step, step * dt, layout, b, 0, b * 64, 0.1, rem)
        target = policy.decide(snap)
        if target:
            switches.append((step, layout, target, b))
            policy.observe_switch(record(step, layout, target))
            layout = target
    return switches


def test_profile_interpolates_and_round_trips(tmp_path):
    assert PROFILE.step_time("tp", 8) == pytest.approx(0.018)
    assert PROFILE.step_time("tp", 6) == pytest.approx(curve("tp", 4, 0), abs=0.003)
    assert PROFILE.step_time("ep", 512) == pytest.approx(curve("ep", 512, 0))  # extrapolated
    assert PROFILE.step_time("tp", 0) == 0.0
    assert PROFILE.crossover() == 9  # tp 0.018 == ep 0.018 at 8: EP strictly faster from 9
    two = StepProfile.synthetic(lambda lay, b, c: b * c * 1e-6, batches=(1, 4), contexts=(100, 300))
    assert two.step_time("tp", 4, 200) == pytest.approx(4 * 200e-6)
    path = str(tmp_path / "p.json")
    PROFILE.save(path)
    assert StepProfile.load(path).step_time("ep", 37) == PROFILE.step_time("ep", 37)


def test_no_flapping_with_noisy_batches_near_crossover():
    # batches uniform in 8 +- noise (up to half the crossover batch), several seeds, no dwell:
    # hysteresis, the median window and confirmation alone keep it from flapping
    for noise in (2, 3, 4):
        for start in ("tp", "ep"):
            for seed in range(3):
                rng = random.Random(seed)
                batches = [8 + rng.randint(-noise, noise) for _ in range(2000)]
                policy = AutoPolicy(PROFILE, AutoConfig(min_dwell_steps=0))
                assert len(simulate(policy, batches, start)) <= 1  # never back and forth


def test_switches_when_it_pays_and_back():
    policy = AutoPolicy(PROFILE)
    batches = [64] * 100 + [2] * 100
    sw = simulate(policy, batches)
    assert [(s, t) for _, s, t, _ in sw] == [("tp", "ep"), ("ep", "tp")]
    # after the batch window filled and the confirming decisions
    assert sw[0][0] == policy.cfg.window + policy.cfg.confirm_steps - 2
    assert 100 <= sw[1][0] < 100 + policy.cfg.window  # once the median has moved
    reasons = [d.reason for d in policy.switch_decisions]
    assert all("switch cost" in r and "saves" in r for r in reasons)


def test_no_switch_when_horizon_too_short():
    # 64 requests with 2 tokens left: EP would save 2 x 15 ms < 2 x 20 ms switch cost
    policy = AutoPolicy(PROFILE)
    short = simulate(policy, [64] * 2, remaining=lambda k: [2 - k] * 64)
    assert short == []
    assert policy.decisions[0].horizon == 2 and "switch cost" in policy.decisions[0].reason
    # the same batch with 200 tokens left switches
    long = simulate(AutoPolicy(PROFILE), [64] * 5, remaining=lambda k: [200 - k] * 64)
    assert [t for _, _, t, _ in long] == ["ep"]


def test_progressive_switch_prices_the_ramp():
    """k = 1 of 48 layers a step: the saving arrives layer by layer, so a batch with 8 tokens
    left does not pay for the switch any more (all at once it does); 12 tokens left do."""
    def first(policy, left):
        snap = EngineSnapshot(0, 0.0, "tp", 64, 0, 64 * 64, 0.1, [left] * 64)
        return policy.decide(snap)

    cfg = AutoConfig(confirm_steps=1)
    assert first(AutoPolicy(PROFILE, cfg), 8) == "ep"
    assert first(AutoPolicy(PROFILE, cfg, progressive_layers=1, num_layers=48), 8) is None
    assert first(AutoPolicy(PROFILE, cfg, progressive_layers=1, num_layers=48), 12) == "ep"


@pytest.mark.parametrize("batch,expect", [(2, "tp"), (64, None)])
def test_in_flight_progressive_switch_reverses_when_load_turns(batch, expect):
    """A switch to EP with a quarter of the layers moved: if the batch has fallen to 2 (TP's
    side of the crossover) the policy turns it back; at 64 it lets it go on."""
    policy = AutoPolicy(PROFILE, AutoConfig(confirm_steps=2), progressive_layers=4, num_layers=48)
    decisions = []
    for step in range(2):
        snap = EngineSnapshot(step, step * 0.01, "tp", batch, 0, batch * 64, 0.1,
                              [300] * batch, transition=("ep", 0.25))
        decisions.append(policy.decide(snap))
    assert decisions == [None, expect]  # a reversal is confirmed like any switch
    last = policy.decisions[-1]
    assert ("reverse" in last.reason) == (expect is not None)
    assert "in flight" in last.reason or expect is not None


def test_respects_dwell_after_a_manual_switch():
    policy = AutoPolicy(PROFILE, AutoConfig(min_dwell_steps=20, confirm_steps=1))
    policy.observe_switch(record(0, "ep", "tp"))  # e.g. an operator's switch at step 0
    sw = simulate(policy, [64] * 40)
    assert [(s, t) for s, _, t, _ in sw] == [(20, "ep")]  # window (16) filled long before
    assert any("dwell" in d.reason and d.action == "hold" for d in policy.decisions)


def test_pause_and_resume():
    policy = AutoPolicy(PROFILE, AutoConfig(confirm_steps=1))
    policy.pause()
    assert simulate(policy, [64] * 10) == []
    policy.resume()
    assert [t for _, _, t, _ in simulate(policy, [64] * 20)] == ["ep"]
    assert ManualPolicy().decide(EngineSnapshot(0, 0.0, "tp", 64, 0, 0, 0.0)) is None


def test_forecast_decay_from_remaining_lengths():
    snap = EngineSnapshot(0, 0.0, "ep", 4, 2, 400, 0.1, [1, 3, 3, 6])
    # waiting requests refill the slots freed by finished ones
    assert forecast_batches(snap, 8, 4) == [4, 4, 4, 3, 3, 3, 2, 2]
    snap = EngineSnapshot(0, 0.0, "ep", 4, 0, 400, 0.1, [1, 3, 3, 6])
    assert forecast_batches(snap, 8, 4) == [4, 3, 3, 1, 1, 1, 0, 0]
    assert forecast_batches(snap, 3, 4, use_remaining=False) == [4, 4, 4]


def test_decaying_rollout_switches_back_before_the_tail():
    """A rollout of 256 with lognormal lengths: EP while the batch is large, TP for the tail;
    with the decay forecast the switch back comes no later than the persistence guess."""
    rng = random.Random(1)
    lengths = [min(400, int(rng.lognormvariate(4.0, 0.8)) + 1) for _ in range(256)]

    def remaining(k):
        return [n - k for n in lengths if n > k]

    steps = max(lengths)
    batches = [len(remaining(k)) for k in range(steps)]
    sw = simulate(AutoPolicy(PROFILE), batches, "tp", remaining)
    assert [(s, t) for _, s, t, _ in sw] == [("tp", "ep"), ("ep", "tp")]
    back_step, back_batch = sw[1][0], sw[1][3]
    assert 8 <= back_batch <= 24  # at the crossover, before the tail

    blind = AutoPolicy(PROFILE, AutoConfig(use_remaining=False))
    sw_blind = simulate(blind, batches, "tp", remaining)
    assert sw_blind[1][0] >= back_step


@pytest.mark.slow
def test_engine_switches_ep_to_tp_as_batch_decays(qwen_dir):
    """2 gloo ranks, a profile with EP faster above batch 4, 8 requests finishing one by one:
    the engine leaves EP for TP, and greedy tokens equal a static EP run on the same engine."""
    from moebius import LLM, SamplingParams

    prof = StepProfile.synthetic(
        lambda lay, b, c: (0.1 + 0.05 * b) if lay == "tp" else (0.2 + 0.025 * b),
        batches=(1, 2, 4, 8, 16),
    )
    assert prof.crossover() == 5
    prompts = [[7 + i, 11, 13 + i] for i in range(8)]
    params = [
        SamplingParams(temperature=0, max_tokens=2 * (i + 1), ignore_eos=True) for i in range(8)
    ]
    with LLM(qwen_dir, ranks=2, layout="ep", enable_prefix_caching=False) as llm:
        static = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert llm.engine.switches == []
        policy = AutoPolicy(prof, AutoConfig(horizon_steps=32, min_dwell_steps=2, confirm_steps=1))
        llm.engine.policy = policy
        auto = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert [(r.source, r.target) for r in llm.engine.switches][:1] == [("ep", "tp")]
        assert auto == static
        assert policy.switch_decisions and "switch cost" in policy.switch_decisions[0].reason


@pytest.mark.slow
def test_engine_policy_reverses_a_progressive_switch_when_load_drops(qwen_dir):
    """2 gloo ranks, one layer a step: the policy starts a switch to EP at batch 8; most
    requests are aborted while it is in flight (batch 2, TP's side of the crossover), the
    policy turns it back half-way, and the survivors' tokens equal a static TP run."""
    from moebius import LLM, SamplingParams

    prof = StepProfile.synthetic(
        lambda lay, b, c: (0.1 + 0.05 * b) if lay == "tp" else (0.2 + 0.025 * b),
        batches=(1, 2, 4, 8, 16),
        switch_seconds={"tp->ep": 0.01, "ep->tp": 0.01},
    )
    prompts = [[7 + i, 11, 13 + i] for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    with LLM(qwen_dir, ranks=2, layout="tp", progressive_layers=1,
             enable_prefix_caching=False) as llm:
        static = [o.outputs[0].token_ids for o in llm.generate(prompts[:2], params)]
        eng = llm.engine
        policy = AutoPolicy(prof, AutoConfig(horizon_steps=32, min_dwell_steps=0, confirm_steps=1),
                            progressive_layers=1, num_layers=eng.cfg.model.num_layers)
        eng.policy = policy
        rids = [eng.add_request(p, params, f"r{i}") for i, p in enumerate(prompts)]
        out = {}
        while eng.scheduler.transition is None:
            eng.step()
        assert eng.scheduler.transition.target == "ep"
        for rid in rids[2:]:
            eng.abort(rid)
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    out[o.request_id] = o.outputs[0].token_ids
        assert eng.layout == "tp" and eng.scheduler.transition is None
        assert any(d.action == "switch" and d.reason.startswith("reverse")
                   for d in policy.decisions)
        assert [out["r0"], out["r1"]] == static
