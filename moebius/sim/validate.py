"""``moebius sim validate``: the cost model's predictions against the step times we measured on
H200 (figures.py: DESIGN.md's probe at 1 GPU and TP2/EP2; BENCHMARKS.md's current engine on
Qwen3-30B-A3B and DeepSeek-V2-Lite shapes; the session-1 engine with CUDA graphs and before
them, eager).

Each figure is predicted by the part of the profile that describes what was measured: the probe
by the probe's constants (no host time, no engine terms), the current engine by the whole
profile, the session-1 engine by ``session1_view`` (the probe's constants plus its extra
latency, its own host constants).

Two predictions per figure: in-sample (the profile as given, which was fitted to these very
figures) and leave-one-out (the profile refitted without that figure, then asked for it): the
second is the honest estimate of the error on a figure the model has not seen. The engine's
2×H200 step times (session 4) are fitted by nothing yet: they are printed apart, as held out,
with the measured weights time of an empty switch. A rollout's wall time is not validated.
"""

from __future__ import annotations

from dataclasses import dataclass

from moebius.config import preset
from moebius.sim.calibrate import FITTED, fit_profile, session1_view
from moebius.sim.cost_model import CostModel, Profile
from moebius.sim.figures import ALL, ENGINE_2GPU, SWITCH_2GPU_WEIGHTS_S, Figure


@dataclass
class Row:
    figure: Figure
    predicted_ms: float
    loo_ms: float | None

    @property
    def error(self) -> float:
        return self.predicted_ms / self.figure.step_ms - 1

    @property
    def loo_error(self) -> float | None:
        return None if self.loo_ms is None else self.loo_ms / self.figure.step_ms - 1


def predict(profile: Profile, f: Figure, figures: list[Figure] = ALL) -> float:
    """Milliseconds the profile predicts for one measured figure (``figures``: those the
    session-1 host constants are refit from)."""
    if f.source == "probe":  # lean graph, no host time (12 layers timed, scaled)
        profile = profile.with_(
            launch="graph",
            host_step_s=0.0,
            host_per_seq_s=0.0,
            engine_layer_latency_s=0.0,
            engine=None,
        )
    elif f.source == "engine":  # the current engine with CUDA graphs
        profile = profile.with_(launch="graph")
    elif f.source == "engine-s1":  # the session-1 engine with CUDA graphs
        profile = session1_view(profile, figures).with_(launch="graph")
    else:  # the session-1 engine before graphs: eager launches
        profile = session1_view(profile, figures).with_(launch="eager")
    cm = CostModel(preset(f.model), f.ranks, profile)
    return cm.decode_step_time(f.layout, f.batch, f.context) * 1e3


def table(profile: Profile, leave_one_out: bool = True, figures: list[Figure] = ALL) -> list[Row]:
    rows = []
    blank = profile.with_(engine=None, **{k: 0.0 for k in FITTED})
    for i, f in enumerate(figures):
        loo = None
        if leave_one_out:
            rest = figures[:i] + figures[i + 1 :]
            loo = predict(fit_profile(rest, base=blank, name="loo"), f, rest)
        rows.append(Row(f, predict(profile, f, figures), loo))
    return rows


def format_table(rows: list[Row]) -> str:
    out = [
        "| source | model | GPUs | layout | batch | measured ms | predicted ms | error | "
        "left-one-out ms | error |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        f = r.figure
        loo = "–" if r.loo_ms is None else f"{r.loo_ms:.1f} | {r.loo_error:+.1%}"
        out.append(
            f"| {f.source} | {f.model} | {f.ranks} | {f.layout.upper()} | {f.batch} | "
            f"{f.step_ms:.1f} | {r.predicted_ms:.1f} | {r.error:+.1%} | {loo} |"
        )
    return "\n".join(out)


def summary(rows: list[Row], label: str = "in-sample") -> str:
    def stats(errs: list[float]) -> str:
        a = [abs(e) for e in errs]
        within = sum(e <= 0.10 for e in a)
        return f"max {max(a):.1%}, mean {sum(a) / len(a):.1%}, {within}/{len(a)} within 10%"

    lines = [f"{label}: {stats([r.error for r in rows])}"]
    loo = [r.loo_error for r in rows if r.loo_error is not None]
    if loo:
        lines.append(f"leave-one-out: {stats(loo)}")
    return "\n".join(lines)


def switch_check(profile: Profile) -> str:
    """The weights part of an empty switch of Qwen3-30B-A3B on 2×H200: measured vs predicted."""
    cm = CostModel(preset("qwen3-30b-a3b"), 2, profile)
    pred = cm.switch_time()
    meas = SWITCH_2GPU_WEIGHTS_S["tp->ep"]
    return (
        f"switch, Qwen3-30B-A3B on 2×H200, weights only (NCCL p2p): measured "
        f"{meas * 1e3:.1f} ms, predicted {pred * 1e3:.1f} ms ({pred / meas - 1:+.1%})"
    )


def main(profile_path: str = "h200", leave_one_out: bool = True) -> list[Row]:
    profile = Profile.load(profile_path)
    rows = table(profile, leave_one_out)
    print(format_table(rows))
    print(summary(rows))
    held = [Row(f, predict(profile, f), None) for f in ENGINE_2GPU]
    print("\nheld out (fitted by nothing): the engine on 2×H200")
    print(format_table(held))
    print(summary(held, "held out"))
    print(switch_check(profile))
    return rows
