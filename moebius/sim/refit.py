"""``moebius sim refit``: the cost model before and after the engine's own terms, against the
current engine's measured single-GPU decode steps (results/sim_refit.{md,json}).

"Before" is the profile as fitted to the session-1 engine (``calibrate.session1_view``: the
probe's constants plus that engine's extra per-layer latency and its host constants, which is
what profiles/h200.json held); "after" is the bundled profile, ``fit_profile(figures.ALL)``,
with ``EngineTerms`` fitted to the rows of figures.ENGINE. Each row also gets its left-one-out
prediction (the profile refitted without it) and the GPU time alone against the graph replay
time, since the host line is most of the remaining error.

The figures are data in figures.py; ``check_sources`` compares them with the results files they
were copied from and names any results/decode_h200_session3*.json not yet copied in.
"""

from __future__ import annotations

import glob
import json
import os

from moebius.sim.calibrate import bundled_profile, session1_view
from moebius.sim.cost_model import Profile
from moebius.sim.figures import ENGINE, ENGINE_FILES, Figure
from moebius.sim.validate import predict, table


def gpu_ms(profile: Profile, f: Figure) -> float:
    """The profile's GPU time alone (no host time) for a figure of the current engine."""
    return predict(profile.with_(host_step_s=0.0, host_per_seq_s=0.0), f)


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def check_sources(root: str = REPO) -> list[str]:
    """Differences between figures.ENGINE and the results files (under the checkout ``root``)
    it was copied from, and session-3 results not copied in yet (empty: all agree)."""
    notes = []
    for path, model in ENGINE_FILES.items():
        full = os.path.join(root, path)
        if not os.path.exists(full):
            notes.append(f"{path}: missing")
            continue
        with open(full) as fh:
            rows = {r["batch"]: r for r in json.load(fh)["rows"]}
        ours = {f.batch: f for f in ENGINE if f.model == model}
        if sorted(rows) != sorted(ours):
            notes.append(f"{path}: batches {sorted(rows)} vs figures.py {sorted(ours)}")
        for b in sorted(set(rows) & set(ours)):
            r, f = rows[b], ours[b]
            if abs(r["step_ms"] - f.step_ms) > 5e-4 or abs(r["host_ms"] - f.host_ms) > 5e-4:
                notes.append(f"{path}: batch {b} differs from figures.py")
    for path in sorted(glob.glob(os.path.join(root, "results/decode_h200_session3*.json"))):
        rel = os.path.relpath(path, root)
        if rel not in ENGINE_FILES:
            notes.append(f"{rel}: not in figures.ENGINE yet (add its rows and refit)")
    return notes


def constants(p: Profile) -> dict:
    """The constants that price a single-GPU engine step, in readable units."""
    c = p.gpu_constants()
    return {
        "layer_latency_us": 1e6 * (c["layer_latency_s"] + c["engine_layer_latency_s"]),
        "mla_layer_latency_us": 1e6 * c["mla_layer_latency_s"],
        "weight_read_TBps": 1e-12 / c["hbm_s_per_byte"],
        "kv_read_TBps": 1e-12 / c["kv_s_per_byte"],
        "host_step_ms": 1e3 * p.host_step_s,
        "host_per_seq_us": 1e6 * p.host_per_seq_s,
    }


def report(after: Profile | None = None) -> dict:
    after = after or bundled_profile()
    before = session1_view(after)
    loo = {r.figure: r.loo_ms for r in table(after) if r.figure.source == "engine"}
    rows = []
    for f in ENGINE:
        b, a, g = predict(before, f), predict(after, f), gpu_ms(after, f)
        measured_gpu = f.step_ms - f.host_ms
        rows.append(
            {
                "model": f.model,
                "batch": f.batch,
                "context": f.context,
                "measured_ms": f.step_ms,
                "before_ms": b,
                "before_error": b / f.step_ms - 1,
                "after_ms": a,
                "after_error": a / f.step_ms - 1,
                "loo_ms": loo[f],
                "loo_error": loo[f] / f.step_ms - 1,
                "measured_gpu_ms": measured_gpu,
                "after_gpu_ms": g,
                "after_gpu_error": g / measured_gpu - 1,
            }
        )
    return {
        "rows": rows,
        "constants": {"before": constants(before), "after": constants(after)},
        "engine_terms": after.engine.__dict__,
        "summary": {k: _stats([r[k] for r in rows]) for k in _ERRORS},
        "source_check": check_sources(),
    }


_ERRORS = ("before_error", "after_error", "loo_error", "after_gpu_error")


def _stats(errs: list[float]) -> dict:
    a = [abs(e) for e in errs]
    return {"max": max(a), "mean": sum(a) / len(a), "within_10pct": sum(e <= 0.10 for e in a)}


HEADER = """# Cost model refit to the current engine

Predicted vs measured decode steps of the current engine (one H200, CUDA graphs, 128-token
prompts, context 141; figures.ENGINE, copied from the results files named there). Before: the
profile fitted to the session-1 engine (probe constants + that engine's extra per-layer latency;
what profiles/h200.json held). After: the bundled profile with the engine's own terms
(`EngineTerms`). Left-one-out: the profile refitted without that row. GPU: the step less its
measured host time, against the profile's GPU time alone. DeepSeek-V2-Lite's "before" uses
this version's MLA weight bytes (the earlier code counted MLA attention as 3× its weights and no
shared experts: 8.22 ms at batch 1, not 8.03). `moebius sim refit --md results/sim_refit.md
--json results/sim_refit.json` writes this file (CPU, seconds).

"""


def markdown(rep: dict) -> str:
    out = [
        "| model | batch | measured ms | before ms | error | after ms | error | "
        "left-one-out ms | error | measured GPU ms | after GPU ms | error |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rep["rows"]:
        out.append(
            f"| {r['model']} | {r['batch']} | {r['measured_ms']:.2f} | {r['before_ms']:.2f} | "
            f"{r['before_error']:+.1%} | {r['after_ms']:.2f} | {r['after_error']:+.1%} | "
            f"{r['loo_ms']:.2f} | {r['loo_error']:+.1%} | {r['measured_gpu_ms']:.2f} | "
            f"{r['after_gpu_ms']:.2f} | {r['after_gpu_error']:+.1%} |"
        )
    out += ["", "| | before | after |", "| --- | ---: | ---: |"]
    labels = {
        "layer_latency_us": "latency per layer, µs",
        "mla_layer_latency_us": "extra per MLA layer, µs",
        "weight_read_TBps": "weight reads, TB/s effective",
        "kv_read_TBps": "KV reads, TB/s effective",
        "host_step_ms": "host per step, ms",
        "host_per_seq_us": "host per sequence, µs",
    }
    b, a = rep["constants"]["before"], rep["constants"]["after"]
    out += [f"| {labels[k]} | {b[k]:.2f} | {a[k]:.2f} |" for k in labels]
    out.append("")
    for k in _ERRORS:
        s = rep["summary"][k]
        out.append(
            f"- {k.replace('_', ' ')}: max {s['max']:.1%}, mean {s['mean']:.1%}, "
            f"{s['within_10pct']}/{len(rep['rows'])} within 10%"
        )
    for note in rep["source_check"]:
        out.append(f"- source check: {note}")
    return "\n".join(out) + "\n"


def main(md: str | None = None, out_json: str | None = None, profile_out: str | None = None):
    after = bundled_profile()
    if profile_out:
        after.save(profile_out)
        print(f"wrote {profile_out}")
    rep = report(after)
    text = HEADER + markdown(rep)
    print(text)
    if md:
        with open(md, "w") as fh:
            fh.write(text)
    if out_json:
        with open(out_json, "w") as fh:
            json.dump(rep, fh, indent=1)
            fh.write("\n")
    return rep
