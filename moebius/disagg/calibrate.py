"""`moebius eldr calibrate`: fit an `EldrModel` (IDF, layers, one centroid per decode
instance) from calibration requests, either a recorded routing trace or your own prompts run
through a local engine.

From prompts: every prompt runs greedy for `max_tokens` tokens with expert recording on; the
prefill counts are the prompt tokens' top-k picks per MoE layer (what a prefill instance
reports), the decode sets the experts picked while generating. Deterministic given the seed.

Both log the calibration set's locality (``signature.locality``: Pearson of a request's prefill
counts with its own decode counts, against another request's), the figure `moebius sim pd`
puts beside its results to say how much a decode router can gain on such traffic.
"""

from __future__ import annotations

import logging

import numpy as np

from moebius.disagg.eldr import EldrModel
from moebius.disagg.signature import length_buckets, locality
from moebius.engine.llm_engine import LLMEngine

log = logging.getLogger("moebius")


def log_locality(prefill: np.ndarray, decode: np.ndarray) -> dict:
    stats = locality(list(prefill), list(decode))
    log.info(
        "calibration locality (prefill vs decode counts, mean Pearson): within a request %.2f, "
        "across requests %.2f",
        stats["within"],
        stats["across"],
    )
    return stats


def calibrate_from_trace(path: str, num_workers: int, *, seed: int = 0) -> EldrModel:
    """Fit on a trace in `moebius.bench.routing_replay`'s format (each prompt's first half as
    the prefill, the rest as the decode)."""
    from moebius.bench.routing_replay import load_trace

    tr = load_trace(path, min_tokens=4)
    groups = length_buckets(tr["lengths"])
    log_locality(tr["prefill"], tr["decode"])
    return EldrModel.fit(
        tr["prefill"].astype(float), tr["decode"] > 0, num_workers, seed=seed, groups=groups
    )


class _RecordingEngine(LLMEngine):
    """An engine that keeps per-request prefill and decode top-k counts."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.scheduler.record_experts = True
        self.prefill_counts: dict[str, np.ndarray] = {}
        self.decode_counts: dict[str, np.ndarray] = {}

    def _on_step_results(self, batch, results) -> None:
        for res in results:
            for rid, counts in (res.expert_counts or {}).items():
                req = self.requests[rid]
                into = self.decode_counts if req.output_token_ids else self.prefill_counts
                into[rid] = into.get(rid, 0) + counts.sum(0)


def record_prompts(
    model_dir: str, prompts: list[str], *, max_tokens: int = 32, **engine_kw
) -> tuple[np.ndarray, np.ndarray]:
    """(prefill counts (N, L, E), decode counts (N, L, E)) of ``prompts`` run greedily."""
    from moebius.config import EngineConfig, ModelConfig
    from moebius.core import SamplingParams

    cfg = EngineConfig(model=ModelConfig.from_dir(model_dir), model_dir=model_dir, **engine_kw)
    engine = _RecordingEngine(cfg)
    try:
        sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        rids = [engine.add_request(p, sp, f"calib-{i}") for i, p in enumerate(prompts)]
        while engine.has_unfinished():
            engine.step()
    finally:
        engine.shutdown()
    shape = (len(cfg.model.moe_layers), cfg.model.num_experts)
    pre = np.stack([engine.prefill_counts.get(r, np.zeros(shape)) for r in rids])
    dec = np.stack([engine.decode_counts.get(r, np.zeros(shape)) for r in rids])
    return pre, dec


def calibrate_from_prompts(
    model_dir: str,
    prompts_file: str,
    num_workers: int,
    *,
    seed: int = 0,
    max_tokens: int = 32,
    **engine_kw,
) -> EldrModel:
    with open(prompts_file) as f:
        prompts = [line.rstrip("\n") for line in f if line.strip()]
    if len(prompts) < num_workers:
        raise ValueError(f"{len(prompts)} prompts cannot calibrate {num_workers} workers")
    pre, dec = record_prompts(model_dir, prompts, max_tokens=max_tokens, **engine_kw)
    log_locality(pre, dec)
    return EldrModel.fit(pre, dec > 0, num_workers, seed=seed)
