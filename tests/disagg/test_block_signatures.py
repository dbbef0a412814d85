"""Expert counts kept per KV block: a prefill whose prompt hits the prefix cache reports the
same per-layer top-k counts (so the same ELDR signature) as one that computes every token."""

from __future__ import annotations

import numpy as np
import pytest

from moebius.config import EngineConfig, ModelConfig
from moebius.core import SamplingParams
from moebius.disagg.roles import PrefillEngine, add_block_counts, prompt_counts

PROMPT = [(7 * i + 3) % 300 + 10 for i in range(37)]  # 9 full blocks of 4 and one partial


def test_block_counts_fold_chunks_and_replace_on_recompute():
    ones = np.ones((1, 2, 3), dtype=np.int64)
    meta: dict = {}
    add_block_counts(meta, 0, np.concatenate([ones, 2 * ones]), 4)  # tokens 0..5: blocks 0, 1
    add_block_counts(meta, 6, 3 * ones, 4)  # tokens 6..7 continue block 1
    assert sorted(meta) == [0, 1]
    assert (meta[1] == 5).all()
    shared = meta[0]
    add_block_counts(meta, 0, 4 * ones, 4)  # recomputed from scratch: replaces, never adds
    assert (meta[0] == 4).all() and (shared == 1).all()  # the old array is untouched
    assert (prompt_counts(meta, 8, 4) == 9).all()
    assert (prompt_counts(meta, 4, 4) == 4).all()  # only the prompt's blocks
    assert prompt_counts({}, 8, 4) is None


def _prefill_counts(engine: PrefillEngine, rid: str) -> tuple[np.ndarray, int]:
    engine.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=4), rid)
    while engine.has_unfinished():
        engine.step()
    meta = engine.exports.pop(rid).meta
    return np.asarray(meta["expert_counts"]), meta["num_cached_tokens"]


@pytest.mark.parametrize("chunk", [8, 64])  # 8: chunked prefill, chunks end mid-block
def test_prefix_cache_hit_keeps_the_signature(qwen_dir, chunk):
    def engine(caching: bool) -> PrefillEngine:
        cfg = EngineConfig(
            model=ModelConfig.from_dir(qwen_dir),
            model_dir=qwen_dir,
            block_size=4,
            max_num_batched_tokens=chunk,
            num_kv_blocks=64,
            enable_prefix_caching=caching,
        )
        return PrefillEngine(cfg)

    cached = engine(True)
    try:
        first, hit0 = _prefill_counts(cached, "a")
        second, hit1 = _prefill_counts(cached, "b")  # same prompt: served from the cache
    finally:
        cached.shutdown()
    plain = engine(False)
    try:
        ref, _ = _prefill_counts(plain, "c")
    finally:
        plain.shutdown()
    top_k = plain.cfg.model.top_k
    assert hit0 == 0 and hit1 == 36  # every full block but the one holding the last token
    assert (ref.sum(-1) == len(PROMPT) * top_k).all()  # every prompt token, every MoE layer
    np.testing.assert_array_equal(first, ref)
    np.testing.assert_array_equal(second, ref)
