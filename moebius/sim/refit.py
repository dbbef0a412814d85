"""``moebius sim refit``: the cost model before and after the engine's own terms, against the
engine's measured single-GPU decode steps (results/sim_refit.{md,json}).

"Before" is the profile as fitted to the session-1 engine (``calibrate.session1_view``: the
probe's constants plus that engine's extra per-layer latency and its host constants, which is
what profiles/h200.json held); "after" is the bundled profile, ``fit_profile(figures.ALL)``,
with ``EngineTerms`` fitted to the current engine's rows (figures.ENGINE, session 3). Each row
also gets its left-one-out prediction (the profile refitted without it) and the GPU time alone
against the graph replay time, since the host line is most of the remaining error. Session 2's
rows (figures.ENGINE_S2) are fitted alone the same way, to show how the terms moved.
``--profile-out`` writes the bundled profile, with the sources of its engine terms.

The figures are data in figures.py; ``check_sources`` compares them with the results files they
were copied from and names any results/decode_h200_session*.json not accounted for.
"""

from __future__ import annotations

import glob
import json
import os

from moebius.sim.calibrate import FITTED, bundled_profile, fit_profile, session1_view
from moebius.sim.cost_model import Profile
from moebius.sim.figures import ALL, ENGINE, ENGINE_FILES, ENGINE_S2, OTHER_FILES, Figure
from moebius.sim.validate import predict, table


def gpu_ms(profile: Profile, f: Figure) -> float:
    """The profile's GPU time alone (no host time) for a figure of the current engine."""
    return predict(profile.with_(host_step_s=0.0, host_per_seq_s=0.0), f)


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def check_sources(root: str = REPO) -> list[str]:
    """Differences between figures.ENGINE_FILES and the results files (under the checkout
    ``root``) they were copied from, and decode results of a session that are neither copied
    in nor in figures.OTHER_FILES (empty: all agree)."""
    notes = []
    for path, ours in ENGINE_FILES.items():
        full = os.path.join(root, path)
        if not os.path.exists(full):
            notes.append(f"{path}: missing")
            continue
        with open(full) as fh:
            rows = {r["batch"]: r for r in json.load(fh)["rows"]}
        ours = {f.batch: f for f in ours}
        if sorted(rows) != sorted(ours):
            notes.append(f"{path}: batches {sorted(rows)} vs figures.py {sorted(ours)}")
        for b in sorted(set(rows) & set(ours)):
            r, f = rows[b], ours[b]
            if abs(r["step_ms"] - f.step_ms) > 5e-4 or abs(r["host_ms"] - f.host_ms) > 5e-4:
                notes.append(f"{path}: batch {b} differs from figures.py")
    for path in sorted(glob.glob(os.path.join(root, "results/decode_h200_session*.json"))):
        rel = os.path.relpath(path, root)
        if rel not in ENGINE_FILES and rel not in OTHER_FILES:
            notes.append(f"{rel}: not in figures.py yet (copy its rows in and refit)")
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


def session2_profile() -> Profile:
    """The same fit with session 2's rows (figures.ENGINE_S2) as the engine's."""
    base = Profile.load("h200").with_(engine=None, **{k: 0.0 for k in FITTED})
    figures = [f for f in ALL if f.source != "engine"] + ENGINE_S2
    return fit_profile(figures, base=base, name="h200-session2")


def _row(f: Figure, **predicted: float) -> dict:
    row = {"model": f.model, "batch": f.batch, "context": f.context, "measured_ms": f.step_ms}
    for name, ms in predicted.items():
        row[f"{name}_ms"], row[f"{name}_error"] = ms, ms / f.step_ms - 1
    return row


def report(after: Profile | None = None) -> dict:
    after = after or bundled_profile()
    before, s2 = session1_view(after), session2_profile()
    loo = {r.figure: r.loo_ms for r in table(after) if r.figure.source == "engine"}
    rows = []
    for f in ENGINE:
        row = _row(f, before=predict(before, f), after=predict(after, f), loo=loo[f])
        gpu, measured = gpu_ms(after, f), f.step_ms - f.host_ms
        row.update(measured_gpu_ms=measured, after_gpu_ms=gpu, after_gpu_error=gpu / measured - 1)
        rows.append(row)
    s2_rows = [
        _row(f, before=predict(before, f), session2_fit=predict(s2, f), after=predict(after, f))
        for f in ENGINE_S2
    ]
    return {
        "rows": rows,
        "session2_rows": s2_rows,
        "constants": {
            "before": constants(before),
            "session2_fit": constants(s2),
            "after": constants(after),
        },
        "engine_terms": after.engine.__dict__,
        "summary": {k: _stats([r[k] for r in rows]) for k in _ERRORS},
        "session2_summary": {
            k: _stats([r[k] for r in s2_rows]) for k in ("before_error", "session2_fit_error")
        },
        "source_check": check_sources(),
    }


_ERRORS = ("before_error", "after_error", "loo_error", "after_gpu_error")


def _stats(errs: list[float]) -> dict:
    a = [abs(e) for e in errs]
    return {"max": max(a), "mean": sum(a) / len(a), "within_10pct": sum(e <= 0.10 for e in a)}


def _summary_line(label: str, s: dict, n: int) -> str:
    return (
        f"- {label}: max {s['max']:.1%}, mean {s['mean']:.1%}, {s['within_10pct']}/{n} within 10%"
    )


HEADER = """# Cost model refit to the current engine

Predicted vs measured decode steps of the engine (one H200, CUDA graphs, 128-token prompts,
context 141), copied into moebius/sim/figures.py from the results files named there: the
current engine (session 3: figures.ENGINE) and, below, the engine one session earlier (session
2: figures.ENGINE_S2). Before: the profile fitted to the session-1 engine (probe constants +
that engine's extra per-layer latency; what profiles/h200.json held). After: the bundled
profile with the engine's own terms (`EngineTerms`) fitted to session 3. Left-one-out: the
profile refitted without that row. GPU: the step less its measured host time, against the
profile's GPU time alone. DeepSeek-V2-Lite's "before" uses this version's MLA weight bytes (the
earlier code counted MLA attention as 3× its weights and no shared experts). `moebius sim
refit --md results/sim_refit.md --json results/sim_refit.json` writes this file (CPU, seconds).

"""

LABELS = {
    "layer_latency_us": "latency per layer, µs",
    "mla_layer_latency_us": "extra per MLA layer, µs",
    "weight_read_TBps": "weight reads, TB/s effective",
    "kv_read_TBps": "KV reads, TB/s effective",
    "host_step_ms": "host per step, ms",
    "host_per_seq_us": "host per sequence, µs",
}


def markdown(rep: dict) -> str:
    out = [
        "## The current engine (session 3)",
        "",
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
    out.append("")
    n = len(rep["rows"])
    out += [_summary_line(k.replace("_", " "), rep["summary"][k], n) for k in _ERRORS]
    out += [
        "",
        "## Session 2's rows: the same method fitted to them, and the session-3 profile",
        "",
        "| model | batch | measured ms | before ms | error | session-2 fit ms | error | "
        "after (session 3) ms | error |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rep["session2_rows"]:
        out.append(
            f"| {r['model']} | {r['batch']} | {r['measured_ms']:.2f} | {r['before_ms']:.2f} | "
            f"{r['before_error']:+.1%} | {r['session2_fit_ms']:.2f} | "
            f"{r['session2_fit_error']:+.1%} | {r['after_ms']:.2f} | {r['after_error']:+.1%} |"
        )
    out.append("")
    n = len(rep["session2_rows"])
    for k, label in (("before_error", "before"), ("session2_fit_error", "session-2 fit")):
        out.append(_summary_line(label, rep["session2_summary"][k], n))
    out += [
        "",
        "## Constants",
        "",
        "| | before (session 1) | session-2 fit | after (session 3) |",
        "| --- | ---: | ---: | ---: |",
    ]
    c = rep["constants"]
    out += [
        f"| {label} | {c['before'][k]:.2f} | {c['session2_fit'][k]:.2f} | {c['after'][k]:.2f} |"
        for k, label in LABELS.items()
    ]
    out += [f"- source check: {note}" for note in rep["source_check"]]
    return "\n".join(out) + "\n"


def engine_sources() -> dict:
    """The ``sources`` entries of the engine terms and host constants: the files they come
    from."""
    files = ", ".join(p for p, rows in ENGINE_FILES.items() if rows[0] in ENGINE)
    return {
        "engine": f"fit: the current engine's single-GPU decode steps with CUDA graphs ({files}; "
        "context 141), gpu ms = ms/step - host ms, NNLS on relative error after the probe's "
        "FLOP and KV terms. layer_latency_s and hbm_s_per_byte replace the probe's; "
        "mla_layer_latency_s from the DeepSeek rows; kv_s_per_byte null: one context cannot "
        "tell KV reads from other per-token work, so the probe's (moebius sim refit)",
        "host_step_s": f"fit: the current engine's host ms ({files}): intercept in batch",
        "host_per_seq_s": f"fit: the current engine's host ms ({files}): slope in batch",
    }


def main(md: str | None = None, out_json: str | None = None, profile_out: str | None = None):
    after = bundled_profile()
    after = after.with_(sources={**after.sources, **engine_sources()})
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
