"""TP and EP over gloo (one process per rank) against single-device and transformers, and live
switches: tokens unchanged, owner-changed bytes only, weights restored bit for bit."""

from __future__ import annotations

import pytest

from moebius import LLM, SamplingParams
from tests.conftest import PROMPTS, hf_greedy

MAX_NEW = 20
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
# uneven lengths: some requests land alone on a rank, some ranks get no tokens for experts
UNEVEN = PROMPTS + ["a", "Science, history, music, art, code, mathematics and sport are topics."]


def tokens(llm, prompts, params=GREEDY):
    ids = [llm.tokenizer.encode(p) for p in prompts]
    return [o.outputs[0].token_ids for o in llm.generate(ids, params)]


@pytest.fixture(scope="module")
def references(qwen_dir, mixtral_dir):
    out = {}
    for name, d in (("qwen", qwen_dir), ("mixtral", mixtral_dir)):
        with LLM(d) as llm:
            ids = [llm.tokenizer.encode(p) for p in UNEVEN]
            out[name] = tokens(llm, UNEVEN)
        hf, _ = hf_greedy(d, ids, MAX_NEW)
        assert hf == out[name], "single device must match transformers"
    return out


@pytest.mark.parametrize("layout", ["tp", "ep"])
@pytest.mark.parametrize("name", ["qwen", "mixtral"])
def test_two_ranks_match_single_device(name, layout, references, qwen_dir, mixtral_dir):
    d = qwen_dir if name == "qwen" else mixtral_dir
    with LLM(d, ranks=2, layout=layout, max_num_batched_tokens=48) as llm:
        assert tokens(llm, UNEVEN) == references[name]
        mem = llm.engine.memory[0]
        # 2 KV heads over 2 ranks: a TP block holds one head, so twice the blocks per rank and
        # the same cluster-wide token capacity as EP (2 ranks x kv_blocks_ep)
        assert mem["kv_blocks_tp"] == 2 * mem["kv_blocks_ep"]


@pytest.mark.parametrize("layout", ["tp", "ep"])
def test_four_ranks_replicated_kv_heads(layout, references, qwen_dir):
    """2 KV heads over 4 ranks: TP replicates each head on two ranks (half the capacity)."""
    with LLM(qwen_dir, ranks=4, layout=layout) as llm:
        assert tokens(llm, UNEVEN) == references["qwen"]
        mem = llm.engine.memory[0]
        # TP: every rank holds every request -> 2·NB_ep tokens-blocks in all; EP: 4·NB_ep
        assert mem["kv_blocks_tp"] == 2 * mem["kv_blocks_ep"]


@pytest.mark.parametrize(
    "name,ranks,schedule",
    [("qwen", 2, ()), ("mixtral", 2, ((2, "tp"), (5, "ep"))), ("qwen", 4, ((3, "tp"),))],
)
def test_alltoall_exchange_matches(name, ranks, schedule, references, qwen_dir, mixtral_dir):
    """EP with all-to-all dispatch/combine (tokens go only to their experts' ranks; over 4
    ranks a top-2 token skips at least two) gives the all-gather path's tokens, switches
    included."""
    d = qwen_dir if name == "qwen" else mixtral_dir
    with LLM(d, ranks=ranks, layout="ep", ep_exchange="alltoall", switch_schedule=schedule,
             max_num_batched_tokens=48) as llm:
        assert tokens(llm, UNEVEN) == references[name]


@pytest.mark.parametrize(
    "schedule",
    [
        [(3, "ep")],
        [(2, "ep"), (6, "tp")],
        [(1, "ep"), (2, "tp"), (4, "ep"), (5, "tp"), (9, "ep"), (11, "tp"), (15, "ep")],
    ],
    ids=["1-switch", "2-switches", "7-switches"],
)
def test_switches_keep_tokens(schedule, references, qwen_dir):
    # a small token budget keeps chunked prefill in flight across the first switches
    with LLM(
        qwen_dir, ranks=2, layout="tp", switch_schedule=schedule, max_num_batched_tokens=16
    ) as llm:
        assert tokens(llm, UNEVEN) == references["qwen"]
        eng = llm.engine
        assert len(eng.switches) == len(schedule)
        for rec in eng.switches:
            assert rec.weight_bytes == eng.expected_switch_weight_bytes()
            assert rec.running > 0


def test_switch_with_preemption_in_flight(references, qwen_dir):
    """A tiny pool forces preemptions (and recompute) while switching back and forth."""
    with LLM(
        qwen_dir,
        ranks=2,
        layout="ep",
        num_kv_blocks=10,
        block_size=4,
        switch_schedule=[(5, "tp"), (12, "ep"), (20, "tp")],
    ) as llm:
        assert tokens(llm, UNEVEN) == references["qwen"]
        assert llm.engine.scheduler.num_preemptions > 0


def test_switch_kv_bytes_match_owner_changes(qwen_dir):
    """TP->EP with 2 ranks and 2 KV heads: each request's other-rank head slice moves once."""
    with LLM(qwen_dir, ranks=2, layout="tp", switch_schedule=[(4, "ep")]) as llm:
        tokens(llm, PROMPTS)
        rec = llm.engine.switches[0]
        cfg = llm.engine.cfg.model
        # every running request had the blocks of its computed tokens moved (whole blocks, the
        # last one partly filled): half its heads cross ranks
        per_token = cfg.num_layers * 2 * (cfg.num_kv_heads // 2) * cfg.head_dim * 4
        per_block = per_token * llm.engine.cfg.block_size
        assert rec.kv_bytes % per_block == 0 and rec.kv_bytes > 0


def test_hundred_switches_restore_weights_bit_for_bit(qwen_dir):
    with LLM(qwen_dir, ranks=2, layout="tp") as llm:
        eng = llm.engine
        digest0 = eng.executor.call("weights_digest")
        addrs0 = eng.executor.call("buffer_addresses")
        for i in range(100):
            eng._do_switch("ep" if i % 2 == 0 else "tp")
            if i == 0:
                assert eng.executor.call("weights_digest") != digest0
        assert eng.layout == "tp"
        assert eng.executor.call("weights_digest") == digest0
        assert eng.executor.call("buffer_addresses") == addrs0
        assert tokens(llm, PROMPTS[:2]) == tokens(llm, PROMPTS[:2])


def test_switch_failing_part_way_stops_the_engine_clearly(qwen_dir, monkeypatch):
    """A rank that fails after swapping experts (before the KV) must not leave a half-switched
    engine running: the engine stops with the rank's error, and stays stopped."""
    from moebius.engine.worker import WorkerError

    monkeypatch.setenv("MOEBIUS_FAULT_SWITCH_RANK", "1")
    llm = LLM(qwen_dir, ranks=2, layout="tp", switch_schedule=[(2, "ep")])
    try:
        with pytest.raises(WorkerError, match="injected failure on rank 1"):
            tokens(llm, PROMPTS[:2])
        with pytest.raises(WorkerError, match="stopped"):
            tokens(llm, PROMPTS[:1])
    finally:
        llm.shutdown()
