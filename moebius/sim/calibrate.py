"""Fit a cost-model profile to measured step times.

``fit_profile(figures)`` is the whole method, in three fits by non-negative least squares on
relative error over graph-mode GPU times (step less the measured host time):

1. The probe constants (per-layer latency, HBM and KV bandwidth, EP latency, collective latency
   and bandwidth) over DESIGN.md's probe (1 and 2 GPUs) and the session-1 engine's rows, which
   share every constant but one: that engine's extra per-layer latency (its ~1,200 kernels a
   step against the probe's leaner graph). This is how the model began, and it is still the
   only source of the EP and collective constants.
2. The engine's own terms (``EngineTerms``) over the current engine's rows: a per-layer latency
   and a weight-read cost that replace the probe's, an extra latency per MLA layer (where
   DeepSeek rows are given), and a KV-read cost only where the rows span two contexts or more
   (else the probe's). The probe's FLOP, EP and collective terms are subtracted first.
3. The host constants (per step, per sequence) by a line through the current engine's host
   times (the session-1 rows' where there are none), the eager launch time per layer from the
   eager rows (session 1's, with that engine's host constants: ``session1_view``).

The FLOP rate is not identifiable from decode steps (they are memory- and latency-bound), so
it is a prior. The bundled ``profiles/h200.json`` is ``fit_profile(figures.ALL)``.

``moebius sim calibrate`` runs the real engine (``moebius.bench.decode.run``) on this machine,
times small collectives through torch.distributed when ``--ranks`` > 1, and writes a profile:
engine rows refit the engine terms and host constants, the device copy bandwidth rescales the
probe's HBM constants, collective timings replace the collective constants. On CPU it is a
smoke run with a tiny model.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace

import numpy as np

from moebius.config import ModelConfig, preset
from moebius.sim.cost_model import CostModel, EngineTerms, Link, Profile, RankWork
from moebius.sim.figures import (
    ALL,
    HBM_COPY_BPS,
    NCCL_ALLGATHER_BPS,
    NCCL_ALLREDUCE_64K_S,
    NCCL_SENDRECV_BPS,
    Figure,
)

FLOPS_PRIOR = 600e12  # ~60% of H200's 989 TFLOPS dense bf16: large prefill GEMMs
FITTED = [
    "layer_latency_s",
    "engine_layer_latency_s",
    "ep_layer_latency_s",
    "hbm_s_per_byte",
    "kv_s_per_byte",
    "coll_latency_s",
    "coll_s_per_byte",
]
FEATURES = [
    "layers",
    "engine_layers",
    "ep_layers",
    "weight_bytes",
    "kv_bytes",
    "coll_hops",
    "coll_bytes",
]
PROBE_SOURCES = ("probe", "engine-s1")  # the rows of fit 1
# EngineTerms field -> the feature it multiplies (fit 2)
ENGINE_FITTED = {
    "layer_latency_s": "layers",
    "hbm_s_per_byte": "weight_bytes",
    "mla_layer_latency_s": "mla_layers",
    "kv_s_per_byte": "kv_bytes",
}


def nnls(A: np.ndarray, y: np.ndarray, iters: int = 200) -> np.ndarray:
    """min ||Ax - y|| subject to x >= 0 (Lawson-Hanson active set)."""
    n = A.shape[1]
    x, active = np.zeros(n), np.zeros(n, bool)
    w = A.T @ (y - A @ x)
    for _ in range(iters):
        if active.all() or (w[~active] <= 1e-12 * np.abs(w).max()).all():
            break
        active[np.argmax(np.where(active, -np.inf, w))] = True
        while True:
            z = np.zeros(n)
            z[active] = np.linalg.lstsq(A[:, active], y, rcond=None)[0]
            if (z[active] > 0).all():
                x = z
                break
            neg = active & (z <= 0)
            x = x + np.min(x[neg] / (x[neg] - z[neg])) * (z - x)
            active &= x > 1e-15
            x[~active] = 0
        w = A.T @ (y - A @ x)
    return x


def blank_profile(name: str = "fit") -> Profile:
    return Profile(name, 0.0, 0.0, 0.0, 0.0, 1 / FLOPS_PRIOR, 0.0, 1.0, 0.0, 0.0, 0.0)


def figure_works(f: Figure) -> list[RankWork]:
    if f.layout == "ep" and f.ranks > 1:
        per = [f.batch // f.ranks + (r < f.batch % f.ranks) for r in range(f.ranks)]
        return [RankWork(b, b, b * f.context) for b in per]
    return [RankWork(f.batch, f.batch, f.batch * f.context)]


def figure_features(model: ModelConfig | None, f: Figure) -> dict:
    """The busiest rank's features of one measured decode step (graph mode); ``model`` None:
    the figure's preset."""
    cm = CostModel(model or preset(f.model), f.ranks, blank_profile())
    ws = figure_works(f)
    total, mx = sum(w.num_tokens for w in ws), max(w.num_tokens for w in ws)
    feats = max(
        (cm.features(f.layout, w, total, mx) for w in ws),
        key=lambda fe: fe["weight_bytes"] + fe["kv_bytes"],
    )
    if f.source == "probe":
        feats["engine_layers"] = 0  # the lean probe has none of the engine's extra kernels
    return feats


def fit_profile(
    figures: list[Figure],
    model: ModelConfig | None = None,
    name: str = "h200",
    base: Profile | None = None,
) -> Profile:
    """The three fits of the module docstring over ``figures``; ``model`` None: each figure's
    preset. What no figure informs stays ``base``'s."""
    prof = base or blank_profile(name)
    probe_rows = [f for f in figures if f.source in PROBE_SOURCES]
    if probe_rows:
        prof = fit_probe(prof, model, probe_rows)
    engine_rows = [f for f in figures if f.source == "engine"]
    if engine_rows:
        prof = fit_engine(prof, model, engine_rows)
    host = fit_host(engine_rows) or fit_host(f for f in figures if f.source == "engine-s1")
    if host:
        prof = prof.with_(**host)
    eager = [f for f in figures if f.source == "eager"]
    if eager:
        s1 = fit_eager(session1_view(prof, figures), model, eager)
        prof = prof.with_(eager_layer_s=s1.eager_layer_s)
    return prof.with_(name=name)


def _nnls_relative(A: np.ndarray, y: np.ndarray, gpu: np.ndarray) -> np.ndarray:
    """NNLS of A·x = y weighted by 1/gpu (relative error), columns scaled to their maxima."""
    scale = A.max(0)
    scale[scale == 0] = 1
    return nnls(A / scale / gpu[:, None], y / gpu) / scale


def fit_probe(prof: Profile, model: ModelConfig | None, rows: list[Figure]) -> Profile:
    """Fit 1: the probe constants (FITTED) over probe and session-1 engine rows."""
    feats = [figure_features(model, f) for f in rows]
    A = np.array([[fe[k] for k in FEATURES] for fe in feats])
    gpu = np.array([(f.step_ms - (f.host_ms or 0.0)) / 1e3 for f in rows])
    y = gpu - np.array([fe["flops"] for fe in feats]) * prof.s_per_flop
    x = _nnls_relative(A, y, gpu)
    prof = prof.with_(**dict(zip(FITTED, map(float, x), strict=True)))
    if prof.coll_s_per_byte == 0:
        prof = prof.with_(coll_s_per_byte=1 / NCCL_SENDRECV_BPS)
    return prof


def fit_engine(prof: Profile, model: ModelConfig | None, rows: list[Figure]) -> Profile:
    """Fit 2: the engine's own terms over the current engine's rows. A term the rows cannot
    tell apart keeps ``prof``'s: the MLA extra without MLA rows, the latency per layer with
    MLA rows only (they fit the extra over it), the KV cost over one context."""
    feats = [figure_features(model, f) for f in rows]
    mla = [fe["mla_layers"] > 0 for fe in feats]
    kept = set()
    if not any(mla):
        kept.add("mla_layer_latency_s")
    elif all(mla):
        kept.add("layer_latency_s")
    if len({f.context for f in rows}) < 2:
        kept.add("kv_s_per_byte")
    fitted = [k for k in ENGINE_FITTED if k not in kept]
    old = prof.engine or EngineTerms(
        prof.layer_latency_s + prof.engine_layer_latency_s, prof.hbm_s_per_byte
    )
    # what this fit does not touch (FLOPs, EP, collectives, the kept terms), priced as it is
    rest = EngineTerms(**{k: 0.0 if k in fitted else v for k, v in old.__dict__.items()})
    fixed = np.array(
        [
            CostModel(model or preset(f.model), f.ranks, prof.with_(engine=rest)).gpu_time(fe)
            for f, fe in zip(rows, feats, strict=True)
        ]
    )
    A = np.array([[fe[ENGINE_FITTED[k]] for k in fitted] for fe in feats])
    gpu = np.array([(f.step_ms - (f.host_ms or 0.0)) / 1e3 for f in rows])
    x = _nnls_relative(A, gpu - fixed, gpu)
    terms = {**old.__dict__, **dict(zip(fitted, map(float, x), strict=True))}
    return prof.with_(engine=EngineTerms(**terms))


def fit_host(rows) -> dict | None:
    """Host constants: a line through the rows' host ms in batch (None: under two rows)."""
    hosted = [f for f in rows if f.host_ms is not None]
    if len(hosted) < 2:
        return None
    per_seq, fixed = np.polyfit([f.batch for f in hosted], [f.host_ms / 1e3 for f in hosted], 1)
    return {"host_step_s": max(float(fixed), 0.0), "host_per_seq_s": max(float(per_seq), 0.0)}


def session1_view(prof: Profile, figures: list[Figure] = ALL) -> Profile:
    """The profile as it priced the session-1 engine (before EngineTerms): the probe's
    constants plus that engine's extra latency, its host constants refit from its rows."""
    return prof.with_(
        engine=None, **(fit_host(f for f in figures if f.source == "engine-s1") or {})
    )


def fit_eager(prof: Profile, model: ModelConfig | None, eager: list[Figure]) -> Profile:
    """Eager engine: step = max(GPU, L·launch) + host(B): the launch time per layer is the
    median of (step - host(B)) / L over rows where it exceeds the GPU time."""
    model = model or preset(eager[0].model)
    host = CostModel(model, 1, prof).host_time
    per_layer = sorted((f.step_ms / 1e3 - host(f.batch)) / model.num_layers for f in eager)
    return prof.with_(eager_layer_s=per_layer[len(per_layer) // 2])


# ------------------------------------------------------------------ a calibration run
def time_collectives(ranks: int, device: str) -> dict:
    """Latency (64 KB all-reduce) and bandwidth (64 MB all-gather) over torch.distributed."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_coll_worker, args=(r, ranks, device, q)) for r in range(ranks)]
    for p in procs:
        p.start()
    out = q.get(timeout=300)
    for p in procs:
        p.join()
    return out


def _coll_worker(rank: int, ranks: int, device: str, q) -> None:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=ranks)
    dev = torch.device(f"cuda:{rank}" if device == "cuda" else "cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)

    def timed(fn, reps: int) -> float:
        for _ in range(3):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps

    small = torch.zeros(32768, dtype=torch.bfloat16, device=dev)
    big_n = (64 << 20) // 2 // ranks if device == "cuda" else (4 << 20) // 2 // ranks
    part = torch.zeros(big_n, dtype=torch.bfloat16, device=dev)
    full = torch.zeros(big_n * ranks, dtype=torch.bfloat16, device=dev)
    lat = timed(lambda: dist.all_reduce(small), 50)
    ag = timed(lambda: dist.all_gather_into_tensor(full, part), 10)
    if rank == 0:
        wire = full.numel() * 2 * (ranks - 1) / ranks
        q.put({"allreduce_64k_s": lat, "allgather_bytes_per_s": wire / ag})
    dist.destroy_process_group()


def calibrate(
    preset_name: str,
    layers: int | None,
    batches: list[int],
    device: str,
    ranks: int,
    base: Profile,
    out: str,
    steps: int = 10,
) -> Profile:
    from moebius.bench.decode import run

    over = {"num_hidden_layers": layers} if layers else {}
    if preset_name == "tiny":  # the test checkpoint's shapes: a CPU smoke run
        from moebius.model.tiny import TINY_SHAPES

        model = preset("qwen3-30b-a3b", **{**TINY_SHAPES, "vocab_size": 384, **over})
    else:
        model = preset(preset_name, **over)
    rows = run(model, batches, prompt_len=128, decode_steps=steps, warmup=3, device=device)
    ctx = 128 + 3 + steps // 2
    engine = [
        Figure("engine", 1, "tp", r["batch"], ctx, r["step_ms"], r.get("host_ms")) for r in rows
    ]
    bw = rows[0]["copy_bw_GBps"] * 1e9
    ratio = HBM_COPY_BPS / bw  # slower memory than H200's: proportionally slower reads
    terms = base.engine
    if terms is not None:  # refit below where the rows have GPU times; rescaled meanwhile
        kv = terms.kv_s_per_byte
        terms = replace(
            terms,
            hbm_s_per_byte=terms.hbm_s_per_byte * ratio,
            kv_s_per_byte=None if kv is None else kv * ratio,
        )
    prof = base.with_(
        name=f"calibrated-{device}",
        hbm_s_per_byte=base.hbm_s_per_byte * ratio,
        kv_s_per_byte=base.kv_s_per_byte * ratio,
        engine=terms,
    )
    if all(f.host_ms is not None for f in engine):
        # this machine's engine rows (one GPU): the engine terms and host constants; the
        # probe, EP and collective constants stay the base's
        prof = fit_profile(engine, model, prof.name, prof)
    else:
        prof = fit_eager(
            prof.with_(launch="eager"),
            model,
            [Figure("eager", 1, "tp", f.batch, ctx, f.step_ms) for f in engine],
        )
    sources = dict(base.sources)
    sources["host"] = f"moebius sim calibrate: engine decode rows {json.dumps(rows)[:400]}"
    if ranks > 1:
        coll = time_collectives(ranks, device)
        # keep the decode-size efficiency of the fit; rescale by the measured all-gather rate
        scale = NCCL_ALLGATHER_BPS / coll["allgather_bytes_per_s"]
        prof = prof.with_(
            coll_latency_s=coll["allreduce_64k_s"] * prof.coll_latency_s / NCCL_ALLREDUCE_64K_S,
            coll_s_per_byte=prof.coll_s_per_byte * scale,
            p2p=Link(coll["allgather_bytes_per_s"], prof.p2p.latency_s),
        )
        sources["collectives"] = f"moebius sim calibrate: {coll}"
    prof = prof.with_(sources=sources)
    prof.save(out)
    print(f"wrote {out}")
    return prof


def bundled_profile() -> Profile:
    """The default profile recomputed from the H200 figures (what h200.json holds)."""
    base = Profile.load("h200").with_(engine=None, **{k: 0.0 for k in FITTED})
    return fit_profile(ALL, base=base)
