"""PNG plots of a ``moebius bench`` result (the JSON that ``harness.py`` writes).

- ``<stem>_timeline.png``: per run, output throughput (tokens/s in time bins) and running batch
  size over time, shaded by layout, with a marker at each switch.
- ``<stem>_latency.png``: CDFs of TTFT and TPOT, one line per run.
- ``<stem>_rollout.png``: wall time of each rollout iteration, one bar per run.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"tp": "tab:blue", "ep": "tab:orange", "auto": "tab:green"}


def _bins(t: list[float], tokens: list[int], width: float) -> tuple[list[float], list[float]]:
    if not t:
        return [], []
    n = int(t[-1] / width) + 1
    acc = [0.0] * n
    for x, k in zip(t, tokens, strict=True):
        acc[min(n - 1, int(x / width))] += k
    return [(i + 0.5) * width for i in range(n)], [a / width for a in acc]


def plot_timeline(result: dict, path: str) -> str:
    runs = result["runs"]
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.4 * len(runs)), sharex=True, squeeze=False)
    span = max((r["steps"]["t"][-1] for r in runs.values() if r["steps"]["t"]), default=1.0)
    width = max(span / 60, 1e-3)
    for ax, (mode, r) in zip(axes[:, 0], runs.items(), strict=True):
        s = r["steps"]
        xs, ys = _bins(s["t"], s["tokens"], width)
        ax.plot(xs, ys, color=COLORS.get(mode, "k"), label="tokens/s")
        ax.set_ylabel(f"{mode}\ntokens/s")
        ax2 = ax.twinx()
        ax2.step(s["t"], s["batch"], where="post", color="gray", lw=0.8, label="batch")
        ax2.set_ylabel("batch")
        start = None  # shade the stretches run in EP
        marks = list(zip(s["t"], s["layout"], strict=True)) + [
            (s["t"][-1] if s["t"] else 0.0, "end")
        ]
        for t, lay in marks:
            if lay == "ep" and start is None:
                start = t
            elif lay != "ep" and start is not None:
                ax.axvspan(start, t, color=COLORS["ep"], alpha=0.12, lw=0)
                start = None
        for sw in r["switches"]:
            ax.axvline(sw["t"], color="red", ls="--", lw=1)
            ax.annotate(
                f"{sw['source']}→{sw['target']}",
                (sw["t"], ax.get_ylim()[1]),
                fontsize=7,
                color="red",
                va="top",
                ha="left",
            )
    axes[-1, 0].set_xlabel("seconds (EP shaded; red: switches)")
    fig.suptitle(f"{result['model']} · {result['ranks']} ranks · {result['workload']['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _cdf(ax, xs: list[float], label: str, color: str) -> None:
    xs = sorted(x * 1e3 for x in xs if x is not None)
    if xs:
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label, color=color)


def plot_latency(result: dict, path: str) -> str:
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    for mode, r in result["runs"].items():
        _cdf(a, [q["ttft"] for q in r["requests"]], mode, COLORS.get(mode, "k"))
        _cdf(b, [q["tpot"] for q in r["requests"]], mode, COLORS.get(mode, "k"))
    a.set_xlabel("TTFT ms")
    b.set_xlabel("TPOT ms")
    a.set_ylabel("fraction of requests")
    a.set_xscale("log")
    a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_rollout(result: dict, path: str) -> str:
    runs = result["runs"]
    iters = max(len(r["iteration_seconds"]) for r in runs.values())
    fig, ax = plt.subplots(figsize=(1.5 + 1.5 * iters, 3))
    w = 0.8 / len(runs)
    for j, (mode, r) in enumerate(runs.items()):
        xs = [i + j * w for i in range(len(r["iteration_seconds"]))]
        bars = ax.bar(xs, r["iteration_seconds"], w, label=mode, color=COLORS.get(mode, "k"))
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(iters)], [f"step {i}" for i in range(iters)])
    ax.set_ylabel("rollout wall time, s")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_all(result: dict, folder: str, stem: str = "bench") -> list[str]:
    os.makedirs(folder, exist_ok=True)
    out = [
        plot_timeline(result, os.path.join(folder, f"{stem}_timeline.png")),
        plot_latency(result, os.path.join(folder, f"{stem}_latency.png")),
    ]
    if result["workload"]["name"] == "rollout":
        out.append(plot_rollout(result, os.path.join(folder, f"{stem}_rollout.png")))
    return out
