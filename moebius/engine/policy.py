"""Switch policies: decide at a step boundary whether to change layout.

The engine calls ``policy.decide(snapshot)`` before every step when no manual switch is
pending; a returned layout is switched to at once. ``ManualPolicy`` never decides by itself.

``AutoPolicy`` forecasts the running batch over a horizon (the decay of a rollout from its
known remaining lengths, otherwise the recent batch persists, plus an estimated inflow), prices
that forecast on both layouts' measured step-time curves (``step_profile.StepProfile``), and
switches when the predicted saving exceeds ``margin`` x the measured switch cost. With a
progressive switch (k of L layers per step) the saving ramps in as layers move, and while
one is in flight the policy prices going on against turning back (only the moved layers
return), so a load that turns back reverses the switch half-way. Hysteresis
(a minimum relative gain), a run of confirming decisions and a minimum dwell keep noise near
the crossover from flapping. Every decision is recorded in ``decisions`` and logged to
``moebius.policy`` with its reason: switches and changes of reason at INFO, the rest at DEBUG.
"""

from __future__ import annotations

import logging
import statistics
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field

log = logging.getLogger("moebius.policy")


@dataclass(frozen=True)
class EngineSnapshot:
    """What a policy may look at: plain numbers, no engine internals."""

    step: int
    now: float  # time.monotonic()
    layout: str  # current layout
    num_running: int
    num_waiting: int
    running_tokens: int  # tokens held by running requests (prompt + output)
    kv_usage: float  # 0..1, mean over block managers
    # per running request: output tokens still allowed (max_tokens - produced); None = unknown
    remaining_tokens: list[int | None] = field(default_factory=list)
    # a progressive switch in flight: (its target, fraction of layers already there)
    transition: tuple[str, float] | None = None


class SwitchPolicy(ABC):
    """Contract: ``decide`` is called once per engine step, on the engine thread, before the
    step is scheduled. Return "tp" or "ep" to switch now, or None to stay. ``observe`` receives
    each step's measured duration and batch size, and each switch's record, for policies that
    learn from them."""

    @abstractmethod
    def decide(self, snap: EngineSnapshot) -> str | None: ...

    def observe_step(self, layout: str, batch_size: int, seconds: float) -> None:  # noqa: B027
        pass

    def observe_switch(self, record) -> None:  # noqa: B027
        pass


class ManualPolicy(SwitchPolicy):
    def decide(self, snap: EngineSnapshot) -> str | None:
        return None


@dataclass(frozen=True)
class AutoConfig:
    """Knobs of ``AutoPolicy``; the defaults suit a GPU engine at 5-50 ms per step."""

    horizon_steps: int = 128  # how far ahead the saving is summed
    margin: float = 2.0  # the saving must exceed margin x the predicted switch cost
    hysteresis: float = 0.10  # ... and the other layout must be this much faster (relative)
    confirm_steps: int = 4  # consecutive decisions that must agree before a switch
    min_dwell_steps: int = 16  # steps after any switch (manual included) before the next
    min_dwell_seconds: float = 0.0
    window: int = 16  # recent batch sizes whose median the persistence forecast uses
    default_switch_seconds: float = 0.05  # until a switch has been measured or profiled
    use_remaining: bool = True  # forecast the decay from known remaining lengths

    def __post_init__(self) -> None:
        if self.horizon_steps < 1 or self.confirm_steps < 1 or self.window < 1:
            raise ValueError("horizon_steps, confirm_steps and window must be >= 1")
        if self.margin < 0 or self.hysteresis < 0 or self.min_dwell_steps < 0:
            raise ValueError("margin, hysteresis and min_dwell_steps must be >= 0")


@dataclass(frozen=True)
class Decision:
    """One call of ``AutoPolicy.decide``: what it predicted and why it acted as it did."""

    step: int
    layout: str
    batch: int
    action: str  # "switch", "stay", "hold" (would switch, held back), "paused"
    reason: str
    target: str | None = None
    stay_seconds: float = 0.0  # predicted time of the horizon in the current layout
    other_seconds: float = 0.0  # ... in the other layout, without the switch
    cost_seconds: float = 0.0  # predicted switch cost
    horizon: int = 0


def forecast_batches(
    snap: EngineSnapshot,
    horizon: int,
    recent_batch: float,
    inflow_per_step: float = 0.0,
    use_remaining: bool = True,
) -> list[float]:
    """Predicted running batch for each of the next ``horizon`` steps.

    With every remaining length known, request r runs while k < remaining_r (the decay of a
    rollout); waiting requests refill the freed slots, and new arrivals (``inflow_per_step``)
    each stay for the mean remaining length. Otherwise the recent batch persists. An empty
    running set forecasts nothing: requests are admitted (prefilled) before anything is decided.
    """
    rem = snap.remaining_tokens
    known = use_remaining and bool(rem) and all(r is not None for r in rem)
    if not known:  # the recent batch already reflects the steady inflow
        return [float(recent_batch) if snap.num_running else 0.0] * horizon
    lengths = sorted(rem)  # type: ignore[arg-type]
    n = len(lengths)
    mean_len = sum(lengths) / n
    out = []
    j = 0
    for k in range(horizon):
        while j < n and lengths[j] <= k:
            j += 1
        alive = n - j
        refill = min(snap.num_waiting, n - alive)
        out.append(alive + refill + inflow_per_step * min(k, mean_len))
    return out


class AutoPolicy(SwitchPolicy):
    """Switch when the predicted saving over the horizon pays for the switch by a margin.

    ``profile`` needs ``step_time(layout, batch, context)`` and ``switch_seconds`` (a dict by
    "src->dst"); measured switches (``observe_switch``) replace the profiled cost.
    """

    def __init__(self, profile, config: AutoConfig | None = None, progressive_layers: int = 0,
                 num_layers: int = 1) -> None:
        self.profile = profile
        self.cfg = config or AutoConfig()
        # a switch moves this fraction of the layers per step (1: all at once)
        self.step_fraction = 1.0
        if progressive_layers:
            self.step_fraction = min(1.0, progressive_layers / num_layers)
        self.decisions: deque[Decision] = deque(maxlen=200_000)
        self.paused = False
        self._recent: deque[int] = deque(maxlen=self.cfg.window)
        self._streak = 0
        self._streak_target: str | None = None
        self._last_switch_step: int | None = None
        self._last_switch_time = float("-inf")
        self._switch_base: dict[str, float] = dict(getattr(profile, "switch_seconds", {}) or {})
        self._kv_seconds_per_token = 0.0
        self._last_tokens = 0
        self._last_now = float("-inf")
        self._last_total: int | None = None
        self._finished_guess = 0
        self._inflow = 0.0
        self._last_tag = ""

    # ------------------------------------------------------------------ manual control
    def pause(self) -> None:
        """Stop deciding (manual control); the engine's manual switches still apply."""
        self.paused = True
        log.info("auto policy paused")

    def resume(self) -> None:
        self.paused = False
        self._streak = 0
        log.info("auto policy resumed")

    # ------------------------------------------------------------------ learning
    def observe_switch(self, record) -> None:
        key = f"{record.source}->{record.target}"
        phases = getattr(record, "phases", None) or {}
        kv = phases.get("kv", 0.0)
        base = max(record.seconds - kv, 0.0)
        old = self._switch_base.get(key)
        self._switch_base[key] = base if old is None else 0.5 * old + 0.5 * base
        if kv > 0 and self._last_tokens > 0:
            per_token = kv / self._last_tokens
            k = self._kv_seconds_per_token
            self._kv_seconds_per_token = per_token if k == 0 else 0.5 * k + 0.5 * per_token
        self._last_switch_step = record.step
        self._last_switch_time = self._last_now  # the snapshot clock of the last decision
        self._streak = 0

    def switch_cost(self, source: str, target: str, running_tokens: int) -> float:
        """Predicted seconds of a switch moving ``running_tokens`` tokens of KV."""
        base = self._switch_base.get(f"{source}->{target}")
        if base is None:
            base = self._switch_base.get(f"{target}->{source}", self.cfg.default_switch_seconds)
        return base + self._kv_seconds_per_token * running_tokens

    def _track_inflow(self, snap: EngineSnapshot) -> None:
        # requests that appeared since the last decision: the growth of running + waiting,
        # plus those that finished (known remaining of 1 at the previous step)
        # (the first decision sees the initial load, not an inflow)
        total = snap.num_running + snap.num_waiting
        if self._last_total is not None:
            arrived = max(0, total - self._last_total + self._finished_guess)
            self._inflow = 0.9 * self._inflow + 0.1 * arrived
        self._last_total = total
        self._finished_guess = sum(1 for r in snap.remaining_tokens if r is not None and r <= 1)

    def _price(self, batches, horizon, ctx, src, dst, start, direction):
        """Seconds of ``horizon`` steps while a share of the layers runs in ``dst``: ``start``
        of them at first, ``direction`` x step_fraction more after each step (clamped to
        [0, 1]); the step time is blended by that share. Runs of an equal batch and share are
        priced at their middle context."""
        total, k = 0.0, 0

        def share(h):
            return min(1.0, max(0.0, start + direction * (h + 1) * self.step_fraction))

        while k < horizon:
            end = k
            while (end + 1 < horizon and batches[end + 1] == batches[k]
                   and share(end + 1) == share(k)):
                end += 1
            n, mid, f = end - k + 1, ctx + (k + end) / 2, share(k)
            t_src = self.profile.step_time(src, batches[k], mid) if f < 1 else 0.0
            t_dst = self.profile.step_time(dst, batches[k], mid) if f > 0 else 0.0
            total += n * ((1 - f) * t_src + f * t_dst)
            k = end + 1
        return total

    # ------------------------------------------------------------------ deciding
    def decide(self, snap: EngineSnapshot) -> str | None:
        self._track_inflow(snap)
        self._last_tokens, self._last_now = snap.running_tokens, snap.now
        if snap.layout != (self.decisions[-1].layout if self.decisions else snap.layout):
            self._streak = 0  # switched by someone else
        if self.paused:
            return self._record(
                Decision(
                    snap.step, snap.layout, snap.num_running, "paused", "paused: manual control"
                ),
                "paused",
            )
        self._recent.append(snap.num_running)
        other = "ep" if snap.layout == "tp" else "tp"
        recent = statistics.median(self._recent)
        batches = forecast_batches(
            snap, self.cfg.horizon_steps, recent, self._inflow, self.cfg.use_remaining
        )
        # an inflow estimate never forecasts more than the engine has recently held
        peak = max(max(self._recent), snap.num_running + snap.num_waiting)
        batches = [min(b, peak) for b in batches]
        horizon = max((k + 1 for k, b in enumerate(batches) if b >= 0.5), default=0)
        ctx = snap.running_tokens / snap.num_running if snap.num_running else 0.0
        if snap.transition is not None:
            return self._decide_in_flight(snap, batches, horizon, ctx)
        stay = self._price(batches, horizon, ctx, snap.layout, other, 0.0, 0)
        steady = self._price(batches, horizon, ctx, snap.layout, other, 1.0, 0)
        # the other layout's time as it would run: its share ramps in over a progressive switch
        other_s = self._price(batches, horizon, ctx, snap.layout, other, 0.0, 1)
        cost = self.switch_cost(snap.layout, other, snap.running_tokens)
        saving = stay - other_s
        d = dict(
            step=snap.step,
            layout=snap.layout,
            batch=snap.num_running,
            target=other,
            stay_seconds=stay,
            other_seconds=other_s,
            cost_seconds=cost,
            horizon=horizon,
        )
        if horizon == 0 or snap.num_running == 0:
            return self._record(Decision(**d, action="stay", reason="idle"), "idle")
        known = self.cfg.use_remaining and all(r is not None for r in snap.remaining_tokens)
        if not known and len(self._recent) < self.cfg.window:
            self._streak = 0
            return self._record(
                Decision(
                    **d,
                    action="stay",
                    reason=(f"warming up: {len(self._recent)}/{self.cfg.window} batch samples"),
                ),
                "warmup",
            )
        gain = (stay - steady) / stay if stay > 0 else 0.0  # the layouts' own difference
        fc = f"forecast batch {batches[0]:.0f}->{batches[horizon - 1]:.0f} over {horizon} steps"
        if gain < self.cfg.hysteresis:
            why = (
                f"{other} not faster by the hysteresis ({gain:+.1%} < "
                f"{self.cfg.hysteresis:.0%}); {fc}"
            )
            self._streak = 0
            return self._record(Decision(**d, action="stay", reason=why), "hysteresis")
        if saving <= self.cfg.margin * cost:
            why = (
                f"saving {saving * 1e3:.1f} ms ({gain:+.1%}) <= {self.cfg.margin:g} x switch "
                f"cost {cost * 1e3:.1f} ms; {fc}"
            )
            self._streak = 0
            return self._record(Decision(**d, action="stay", reason=why), "margin")
        why = (
            f"{other} saves {saving * 1e3:.1f} ms ({gain:+.1%}) > {self.cfg.margin:g} x "
            f"switch cost {cost * 1e3:.1f} ms; {fc}"
        )
        if self._streak_target != other:
            self._streak, self._streak_target = 0, other
        self._streak += 1
        if self._last_switch_step is not None:
            since = snap.step - self._last_switch_step
            if since < self.cfg.min_dwell_steps:
                return self._record(
                    Decision(
                        **d,
                        action="hold",
                        reason=(f"{why}; dwell {since}/{self.cfg.min_dwell_steps} steps"),
                    ),
                    "dwell",
                )
            since_s = snap.now - self._last_switch_time
            if since_s < self.cfg.min_dwell_seconds:
                return self._record(
                    Decision(
                        **d,
                        action="hold",
                        reason=(f"{why}; dwell {since_s:.2f}/{self.cfg.min_dwell_seconds:g} s"),
                    ),
                    "dwell",
                )
        if self._streak < self.cfg.confirm_steps:
            return self._record(
                Decision(
                    **d,
                    action="hold",
                    reason=(f"{why}; confirming {self._streak}/{self.cfg.confirm_steps}"),
                ),
                "confirm",
            )
        self._streak = 0
        self._record(Decision(**d, action="switch", reason=why), "switch")
        return other

    def _decide_in_flight(self, snap: EngineSnapshot, batches, horizon, ctx) -> str | None:
        """A progressive switch towards ``target`` has a share ``p`` of the layers there: go on
        (None) or turn back (return the other layout), whichever the horizon prices lower.
        Going on still costs the unmoved (1 - p) of a switch; turning back costs p of one."""
        target, p = snap.transition
        src = "ep" if target == "tp" else "tp"
        full = self.switch_cost(src, target, snap.running_tokens)
        on = self._price(batches, horizon, ctx, src, target, p, 1) + (1 - p) * full
        back_cost = p * full
        back = self._price(batches, horizon, ctx, src, target, p, -1) + back_cost
        saving = on - back
        d = dict(step=snap.step, layout=snap.layout, batch=snap.num_running, target=src,
                 stay_seconds=on, other_seconds=back - back_cost, cost_seconds=back_cost,
                 horizon=horizon)
        gain = saving / on if on > 0 else 0.0
        if horizon == 0 or gain < self.cfg.hysteresis or saving <= self.cfg.margin * back_cost:
            self._streak = 0
            why = (f"switch to {target} in flight ({p:.0%} of layers moved): going on is "
                   f"priced {on * 1e3:.1f} ms, turning back {back * 1e3:.1f} ms")
            return self._record(Decision(**d, action="stay", reason=why), "in-flight")
        if self._streak_target != src:
            self._streak, self._streak_target = 0, src
        self._streak += 1
        why = (f"load turned: back to {src} saves {saving * 1e3:.1f} ms ({gain:+.1%}) with "
               f"{p:.0%} of layers to return")
        if self._streak < self.cfg.confirm_steps:
            return self._record(Decision(**d, action="hold", reason=f"{why}; confirming "
                                         f"{self._streak}/{self.cfg.confirm_steps}"), "confirm")
        self._streak = 0
        self._record(Decision(**d, action="switch", reason=f"reverse: {why}"), "switch")
        return src

    def _record(self, dec: Decision, tag: str) -> None:
        """Keep the decision; log it at INFO when it switches or its kind of reason changes."""
        self.decisions.append(dec)
        level = logging.INFO if tag == "switch" or tag != self._last_tag else logging.DEBUG
        self._last_tag = tag
        if log.isEnabledFor(level):
            verb = f"SWITCH {dec.layout}->{dec.target}" if dec.action == "switch" else dec.action
            log.log(
                level,
                "step %d %s batch %d: %s: %s",
                dec.step,
                dec.layout,
                dec.batch,
                verb,
                dec.reason,
            )

    @property
    def switch_decisions(self) -> list[Decision]:
        return [d for d in self.decisions if d.action == "switch"]
