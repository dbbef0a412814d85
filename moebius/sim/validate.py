"""``moebius sim validate``: the cost model's predictions against the step times we measured on
H200 (figures.py: DESIGN.md's probe at 1 GPU and TP2/EP2, BENCHMARKS.md's engine rows with CUDA
graphs and before them, eager).

Two predictions per figure: in-sample (the profile as given, which was fitted to these very
figures) and leave-one-out (the profile refitted without that figure, then asked for it): the
second is the honest estimate of the error on a figure the model has not seen. Switch times and
a rollout's wall time have not been measured on H200 yet: they are printed as predictions only.
"""

from __future__ import annotations

from dataclasses import dataclass

from moebius.config import preset
from moebius.sim.calibrate import FITTED, fit_profile
from moebius.sim.cost_model import CostModel, Profile
from moebius.sim.figures import ALL, Figure


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


def predict(profile: Profile, f: Figure) -> float:
    """Milliseconds the profile predicts for one measured figure."""
    model = preset("qwen3-30b-a3b")
    if f.source == "probe":  # lean graph, no host time (12 layers timed, scaled)
        profile = profile.with_(
            launch="graph", host_step_s=0.0, host_per_seq_s=0.0, engine_layer_latency_s=0.0
        )
    elif f.source == "engine":  # the engine with CUDA graphs
        profile = profile.with_(launch="graph")
    else:  # the engine before graphs: eager launches
        profile = profile.with_(launch="eager")
    return CostModel(model, f.ranks, profile).decode_step_time(f.layout, f.batch, f.context) * 1e3


def table(profile: Profile, leave_one_out: bool = True) -> list[Row]:
    rows = []
    blank = profile.with_(**{k: 0.0 for k in FITTED})
    for i, f in enumerate(ALL):
        loo = None
        if leave_one_out:
            rest = ALL[:i] + ALL[i + 1 :]
            loo = predict(fit_profile(rest, base=blank, name="loo"), f)
        rows.append(Row(f, predict(profile, f), loo))
    return rows


def format_table(rows: list[Row]) -> str:
    out = [
        "| source | GPUs | layout | batch | measured ms | predicted ms | error | "
        "left-one-out ms | error |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        f = r.figure
        loo = "–" if r.loo_ms is None else f"{r.loo_ms:.1f} | {r.loo_error:+.1%}"
        out.append(
            f"| {f.source} | {f.ranks} | {f.layout.upper()} | {f.batch} | "
            f"{f.step_ms:.1f} | {r.predicted_ms:.1f} | {r.error:+.1%} | {loo} |"
        )
    return "\n".join(out)


def summary(rows: list[Row]) -> str:
    def stats(errs: list[float]) -> str:
        a = [abs(e) for e in errs]
        within = sum(e <= 0.10 for e in a)
        return f"max {max(a):.1%}, mean {sum(a) / len(a):.1%}, {within}/{len(a)} within 10%"

    lines = [f"in-sample: {stats([r.error for r in rows])}"]
    loo = [r.loo_error for r in rows if r.loo_error is not None]
    if loo:
        lines.append(f"leave-one-out: {stats(loo)}")
    return "\n".join(lines)


def predictions_unmeasured(profile: Profile) -> str:
    """What we predict but have not measured: switch times of Qwen3-30B-A3B on 2×H200."""
    model = preset("qwen3-30b-a3b")
    cm = CostModel(model, 2, profile)
    return (
        f"not measured yet (prediction only): Qwen3-30B-A3B switch on 2×H200, weights only: "
        f"{cm.switch_time() * 1e3:.0f} ms"
    )


def main(profile_path: str = "h200", leave_one_out: bool = True) -> list[Row]:
    profile = Profile.load(profile_path)
    rows = table(profile, leave_one_out)
    print(format_table(rows))
    print(summary(rows))
    print(predictions_unmeasured(profile))
    return rows
