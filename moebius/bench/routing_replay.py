"""Trace replay of decode routing on real MoE routing logs: does ELDR cut distinct experts?

Owns the offline evaluation of decode-routing policies (moebius.disagg.eldr) on a routing
trace (format: /work/shared/data/README.md). Each prompt (BOS dropped) is split in halves: the
first half is the "prefill" (its per-layer top-k counts give the signature), the second half
stands in for the decode tokens (the data has no generated tokens). Prompts are split, seeded,
into calibration (fit IDF, layers, centroids) and evaluation (everything reported).

Reports (a) how well signature similarity predicts decode expert overlap on held-out pairs,
raw and with prompt length controlled, and (b) a decode-step simulation: a closed loop keeps
workers * batch requests in flight (arrivals in seeded random order, no request twice in flight
at once); the router places each arrival with a policy; each step a worker reads the union of
the experts its requests' current tokens picked, per layer. Only steps at full concurrency count.

    python -m moebius.bench.routing_replay --data DATA.npz --workers 4 16 --batch 4 8 32 \
        --out results/routing_replay.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from moebius.disagg.eldr import EldrModel, make_policy
from moebius.disagg.kmeans import balanced_kmeans
from moebius.disagg.signature import (
    fit_idf,
    layer_set_cosine,
    length_buckets,
    pair_cosines_by_layer_set,
    pair_jaccard,
    rankdata,
    sample_pairs,
    select_layers,
    signatures,
    spearman,
    topk_counts,
)

POLICIES = ("eldr", "least_load", "round_robin", "random", "eldr_oracle")


def load_trace(path: str, min_tokens: int) -> dict[str, np.ndarray]:
    """Prefill counts, decode counts (N, L, E), decode tokens, lengths of prompts >= min_tokens."""
    data = np.load(path)
    experts, offsets, num_experts = data["experts"], data["offsets"], int(data["num_experts"])
    pre, dec, toks, lengths = [], [], [], []
    for i in range(len(offsets) - 1):
        tokens = experts[offsets[i] + 1 : offsets[i + 1]]  # drop BOS: identical in every prompt
        if len(tokens) < min_tokens:
            continue
        half = len(tokens) // 2
        pre.append(topk_counts(tokens[:half], num_experts))
        dec.append(topk_counts(tokens[half:], num_experts))
        toks.append(tokens[half:])
        lengths.append(len(tokens))
    dec_off = np.r_[0, np.cumsum([len(t) for t in toks])]
    return dict(
        prefill=np.stack(pre),
        decode=np.stack(dec),
        tokens=np.concatenate(toks),
        tok_off=dec_off,
        lengths=np.asarray(lengths),
    )


def partial_spearman(x: np.ndarray, y: np.ndarray, controls: list[np.ndarray]) -> float:
    """Spearman of x and y after regressing both ranks on the controls' ranks."""
    design = np.column_stack([np.ones(len(x))] + [rankdata(c) for c in controls])
    res = []
    for v in (x, y):
        r = rankdata(v)
        res.append(r - design @ np.linalg.lstsq(design, r, rcond=None)[0])
    return float(np.corrcoef(res[0], res[1])[0, 1])


def prediction_quality(tr: dict, idf: np.ndarray, layer_sets: dict, ev: np.ndarray, seed: int):
    """Held-out Spearman of signature cosine vs decode Jaccard, raw and length-controlled."""
    pairs = ev[sample_pairs(len(ev), 30000, seed + 1)]
    pre, dec_sets, lens = tr["prefill"].astype(float), tr["decode"] > 0, tr["lengths"]
    jac = pair_jaccard(dec_sets, pairs)
    la, lb = np.log(lens[pairs[:, 0]]), np.log(lens[pairs[:, 1]])
    controls = [la + lb, np.abs(la - lb)]

    pieces = pair_cosines_by_layer_set(pre, idf, pairs)
    out = {"num_pairs": len(pairs), "length_only": spearman(la + lb, jac)}
    for name, layers in layer_sets.items():
        c = layer_set_cosine(*pieces, list(layers))
        out[name] = {
            "layers": list(map(int, layers)),
            "spearman": spearman(c, jac),
            "length_controlled": partial_spearman(c, jac, controls),
        }
    c = layer_set_cosine(
        *pair_cosines_by_layer_set(pre, np.ones_like(idf), pairs), list(range(pre.shape[1]))
    )
    out["all_layers_no_idf"] = {
        "spearman": spearman(c, jac),
        "length_controlled": partial_spearman(c, jac, controls),
    }
    out["per_layer"] = [spearman(layer_set_cosine(*pieces, [l]), jac) for l in range(pre.shape[1])]
    return out


class RandomBatchCurve:
    """Expected distinct experts per layer of b tokens drawn at random from the pool's decode
    tokens: the batch-size baseline that separates locality from load imbalance (the union is
    concave in b, so uneven batches alone lower the mean distinct count per worker)."""

    def __init__(self, tr: dict, pool: np.ndarray, seed: int, samples: int = 64) -> None:
        self.tokens = tr["tokens"][
            np.concatenate([np.arange(tr["tok_off"][r], tr["tok_off"][r + 1]) for r in pool])
        ]
        self.num_experts, self.samples = tr["prefill"].shape[2], samples
        self.rng, self.cache = np.random.default_rng(seed), {0: 0.0}

    def __call__(self, b: int) -> float:
        if b not in self.cache:
            pick = np.stack(
                [
                    self.rng.choice(len(self.tokens), min(b, len(self.tokens)), replace=False)
                    for _ in range(self.samples)
                ]
            )
            used = np.zeros((self.samples, self.tokens.shape[1], self.num_experts), dtype=bool)
            layer = np.arange(self.tokens.shape[1])[None, None, :, None]
            used[np.arange(self.samples)[:, None, None, None], layer, self.tokens[pick]] = True
            self.cache[b] = float(used.sum(-1).mean())
        return self.cache[b]


# Decode step time vs distinct experts per layer, measured on one H200 (Qwen3-30B-A3B shapes,
# batch 64, CUDA graphs; BENCHMARKS.md, `python -m moebius.bench.expert_locality`): the
# fraction of a layer's experts a step activates -> milliseconds.
H200_MECHANISM = (
    (8 / 128, 16.95),
    (16 / 128, 18.33),
    (32 / 128, 20.93),
    (64 / 128, 25.88),
    (1.0, 35.39),
)


def load_mechanism(path: str | None):
    """(fractions, ms) of a step-time-vs-distinct-experts curve (expert_locality's JSON)."""
    if path is None:
        pts = H200_MECHANISM
    else:
        with open(path) as f:
            rows = json.load(f)
        top = max(r["distinct_experts"] for r in rows)
        pts = [(r["distinct_experts"] / top, r["step_ms"]) for r in rows]
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def simulate(
    tr, policy, sigs, pool, workers: int, batch: int, seed: int, curve, mechanism=None
) -> dict:
    """Closed-loop decode replay of the requests in pool; see the module docstring. With a
    ``mechanism`` curve, each worker's step time follows from its distinct experts, and every
    token it decodes in that step sees that time (TPOT samples)."""
    rng = np.random.default_rng(seed)
    arrivals = list(np.concatenate([rng.permutation(pool) for _ in range(3)]))
    tokens, tok_off = tr["tokens"], tr["tok_off"]
    num_layers, num_experts = tokens.shape[1], tr["prefill"].shape[2]
    req, pos, wrk = (np.zeros(0, np.int64) for _ in range(3))
    distinct, reads, ntok, imbalance, steps, expected = 0.0, 0.0, 0, 0.0, 0, 0.0
    tpot: list[float] = []
    target = workers * batch
    while arrivals or len(req):
        busy = set(req.tolist())
        while len(req) < target and arrivals:
            idx = next((k for k, r in enumerate(arrivals[:target]) if r not in busy), None)
            if idx is None:
                break
            r = arrivals.pop(idx)
            loads = np.bincount(wrk, minlength=workers).tolist()
            w = policy.choose(sigs[r], loads)
            req, pos, wrk = np.r_[req, r], np.r_[pos, 0], np.r_[wrk, w]
            busy.add(r)
        if len(req) == target:  # steady state only: the drain tail has smaller batches
            step_tokens = tokens[tok_off[req] + pos]  # (M, L, k)
            used = np.zeros((workers, num_layers, num_experts), dtype=bool)
            used[wrk[:, None, None], np.arange(num_layers)[None, :, None], step_tokens] = True
            loads = np.bincount(wrk, minlength=workers)
            per_worker = used.sum(-1).mean(-1)  # (W,) distinct experts per layer
            distinct += per_worker[loads > 0].mean()
            expected += np.mean([curve(int(b)) for b in loads[loads > 0]])
            reads += per_worker.sum()
            ntok += len(req)
            imbalance += loads.max() / loads.mean()
            steps += 1
            if mechanism is not None:
                ms = np.interp(per_worker / num_experts, *mechanism)
                tpot += [m for m, b in zip(ms, loads, strict=True) for _ in range(int(b))]
        pos = pos + 1
        alive = pos < tok_off[req + 1] - tok_off[req]
        req, pos, wrk = req[alive], pos[alive], wrk[alive]
    if steps == 0:
        return {"steps": 0}
    return {
        "steps": steps,
        "distinct_per_layer": distinct / steps,
        "reads_per_token": reads / ntok,
        "vs_random_same_size": distinct / expected,
        "max_over_mean_load": imbalance / steps,
        **(
            {
                "tpot_p50_ms": float(np.percentile(tpot, 50)),
                "tpot_p99_ms": float(np.percentile(tpot, 99)),
            }
            if tpot
            else {}
        ),
    }


def workloads(tr, model_sigs: np.ndarray, ev: np.ndarray, seed: int, num_topics: int = 8):
    """Evaluation pools: uniform, by prompt length, and topic mixes from signature clusters."""
    lens = tr["lengths"][ev]
    median = np.median(lens)
    _, topic = balanced_kmeans(model_sigs[ev], num_topics, seed=seed, balanced=False)
    sizes = np.bincount(topic, minlength=num_topics)
    top2 = np.argsort(-sizes, kind="stable")[:2]
    centroid_sim = np.zeros(len(ev))
    for t in range(num_topics):
        members = topic == t
        c = model_sigs[ev][members].mean(0)
        centroid_sim[members] = model_sigs[ev][members] @ (c / max(np.linalg.norm(c), 1e-12))
    tight = np.zeros(len(ev), dtype=bool)
    for t in range(num_topics):
        members = np.flatnonzero(topic == t)
        tight[members[centroid_sim[members] >= np.median(centroid_sim[members])]] = True
    return {
        "uniform": ev,
        "short_prompts": ev[lens < median],
        "long_prompts": ev[lens >= median],
        "two_topics": ev[np.isin(topic, top2)],
        "tight_topics": ev[tight],
    }, {"topic_sizes": sizes.tolist(), "median_prompt_tokens": float(median)}


def run(args: argparse.Namespace) -> dict:
    t0 = time.time()
    tr = load_trace(args.data, args.min_tokens)
    n = len(tr["lengths"])
    perm = np.random.default_rng(args.seed).permutation(n)
    cal, ev = np.sort(perm[: int(n * args.calib_frac)]), np.sort(perm[int(n * args.calib_frac) :])
    pre, dec_sets = tr["prefill"].astype(float), tr["decode"] > 0
    idf = fit_idf(pre[cal])
    layers, calib_rho = select_layers(pre[cal], dec_sets[cal], idf, seed=args.seed)
    groups = length_buckets(tr["lengths"][cal])
    layers_lm, _ = select_layers(pre[cal], dec_sets[cal], idf, seed=args.seed, groups=groups)
    all_layers = list(range(pre.shape[1]))
    layer_sets = {
        "selected": layers,
        "selected_length_matched": layers_lm,
        "all_layers": all_layers,
    }
    result = {
        "config": vars(args),
        "num_requests": n,
        "num_calib": len(cal),
        "num_eval": len(ev),
        "calib_spearman_selected": calib_rho,
        "prediction": prediction_quality(tr, idf, layer_sets, ev, args.seed),
    }
    sigs = signatures(pre, idf, layers)
    dec_idf = fit_idf(tr["decode"][cal].astype(float))
    oracle_sigs = signatures(tr["decode"].astype(float), dec_idf, all_layers)
    pools, info = workloads(tr, signatures(pre, idf, all_layers), ev, args.seed)
    result["workloads"] = {k: len(v) for k, v in pools.items()} | info
    rows = []
    mechanism = load_mechanism(args.mechanism)
    for workers in args.workers:
        model = EldrModel.fit(pre[cal], dec_sets[cal], workers, seed=args.seed, layers=layers)
        oracle = EldrModel.fit(
            tr["decode"][cal].astype(float),
            dec_sets[cal],
            workers,
            seed=args.seed,
            layers=all_layers,
        )
        for name, pool in pools.items():
            curve = RandomBatchCurve(tr, pool, args.seed)
            for batch in args.batch:
                if workers * batch > args.max_fill * len(pool):
                    continue  # would need the same request in flight twice
                for pol in args.policies:
                    for tau in (
                        args.tau if pol == "eldr" else [0.1 if pol == "eldr_oracle" else None]
                    ):
                        policy = make_policy(
                            pol.removesuffix("_oracle"),
                            seed=args.seed,
                            model=oracle if pol == "eldr_oracle" else model,
                            tau=tau if tau is not None else 0.1,
                        )
                        s = oracle_sigs if pol == "eldr_oracle" else sigs
                        m = simulate(
                            tr, policy, s, pool, workers, batch, args.seed, curve, mechanism
                        )
                        rows.append(
                            dict(
                                workload=name,
                                workers=workers,
                                batch=batch,
                                policy=pol,
                                tau=tau,
                                **m,
                            )
                        )
    result["replay"] = rows
    result["seconds"] = time.time() - t0
    return result


def table(rows: list[dict], tau: float = 0.1) -> str:
    """Markdown: per workload/workers/batch, distinct experts per layer and change vs baselines."""
    head = (
        "| workload | W | batch/W | policy | distinct/layer | vs round_robin | vs least_load "
        "| reads/token | vs random batch of same size | max/mean load | TPOT p50 / p99 ms |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    key = lambda r: (r["workload"], r["workers"], r["batch"])  # noqa: E731
    base = {(key(r), r["policy"]): r for r in rows if r.get("steps")}
    lines, nan = [], float("nan")
    for r in rows:
        if not r.get("steps") or (r["tau"] is not None and r["tau"] != tau):
            continue
        rr, ll = base.get((key(r), "round_robin")), base.get((key(r), "least_load"))
        d = r["distinct_per_layer"]
        rel = [f"{100 * (d / b['distinct_per_layer'] - 1):+.1f}%" if b else "-" for b in (rr, ll)]
        lines.append(
            f"| {r['workload']} | {r['workers']} | {r['batch']} | {r['policy']} "
            f"| {d:.2f} | {rel[0]} | {rel[1]} | {r['reads_per_token']:.2f} "
            f"| {100 * (r['vs_random_same_size'] - 1):+.1f}% "
            f"| {r['max_over_mean_load']:.2f} "
            f"| {r.get('tpot_p50_ms', nan):.2f} / {r.get('tpot_p99_ms', nan):.2f} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="/work/shared/data/routing-deepseek-v2-lite-puffin-1-1000.npz")
    p.add_argument("--workers", type=int, nargs="+", default=[4, 16])
    p.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=[4, 8, 32],
        help="in-flight requests per worker (concurrency = workers * batch)",
    )
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--tau", type=float, nargs="+", default=[0.0, 0.1, 0.3])
    p.add_argument("--calib-frac", type=float, default=0.4)
    p.add_argument("--min-tokens", type=int, default=4, help="prompt tokens after BOS, at least")
    p.add_argument(
        "--max-fill",
        type=float,
        default=0.8,
        help="skip configs whose concurrency exceeds this fraction of the pool",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--mechanism",
        default=None,
        help="expert_locality JSON (step ms vs distinct experts); default: the H200 "
        "curve in BENCHMARKS.md",
    )
    p.add_argument("--out", default="results/routing_replay.json")
    p.add_argument("--md", default=None, help="markdown table path (default: --out with .md)")
    args = p.parse_args(argv)
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    pred = result["prediction"]
    summary = [
        f"requests {result['num_requests']} (calib {result['num_calib']}, "
        f"eval {result['num_eval']}); workloads {result['workloads']}",
        f"held-out Spearman(sig cos, decode Jaccard): length only {pred['length_only']:.3f}",
    ]
    for name in ("selected", "selected_length_matched", "all_layers", "all_layers_no_idf"):
        q = pred[name]
        summary.append(
            f"  {name} {q.get('layers', '')}: {q['spearman']:.3f}, "
            f"length-controlled {q['length_controlled']:.3f}"
        )
    cmd = " ".join(
        ["python -m moebius.bench.routing_replay", *(sys.argv[1:] if argv is None else argv)]
    )
    when = time.strftime("%Y-%m-%d")
    head = f"`{cmd}` ({platform.machine()} CPU, {when}, {result['seconds']:.0f} s)"
    taus = [
        f"| {r['workload']} | {r['workers']} | {r['batch']} | {r['tau']} "
        f"| {r['reads_per_token']:.2f} "
        f"| {100 * (r['vs_random_same_size'] - 1):+.1f}% | {r['max_over_mean_load']:.2f} |"
        for r in result["replay"]
        if r["policy"] == "eldr" and r["workload"] == "uniform" and r.get("steps")
    ]
    tau_table = (
        "| workload | W | batch/W | tau | reads/token | vs random batch of same size "
        "| max/mean load |\n|---|---|---|---|---|---|---|\n"
    )
    text = (
        head
        + "\n\n"
        + "\n".join(summary)
        + "\n\n"
        + table(result["replay"])
        + "\nELDR tau sweep:\n\n"
        + tau_table
        + "\n".join(taus)
        + "\n"
    )
    Path(args.md or out.with_suffix(".md")).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
