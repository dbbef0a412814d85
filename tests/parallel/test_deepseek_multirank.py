"""DeepSeek-V2/V3 (MLA) over two gloo ranks: TP, EP and live switches give the single-device
tokens (which equal transformers', tests/model/test_deepseek.py). The latent is one KV head,
replicated under TP: the same blocks per rank in both views (TP holds 1/N of EP's tokens
cluster-wide), TP->EP moves no KV, EP->TP broadcasts each request's latent from its owner."""

from __future__ import annotations

import pytest

from moebius import LLM, SamplingParams
from moebius.model.tiny import write_tiny_checkpoint
from tests.conftest import PROMPTS

MAX_NEW = 16
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
UNEVEN = PROMPTS + ["a", "Science, history, music, art, code, mathematics and sport are topics."]


def tokens(llm, prompts=UNEVEN):
    ids = [llm.tokenizer.encode(p) for p in prompts]
    return [o.outputs[0].token_ids for o in llm.generate(ids, GREEDY)]


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> dict[str, tuple[str, list]]:
    out = {}
    for arch in ("deepseek_v2", "deepseek_v3"):
        d = write_tiny_checkpoint(str(tmp_path_factory.mktemp(arch)), arch, seed=3)
        with LLM(d) as llm:
            out[arch] = (d, tokens(llm))
    return out


def test_tp_matches_single_device(refs):
    """V2 (q_proj, no q_lora) under TP; V2 under EP runs in the preemption test and V3
    (q_a/q_b) in both layouts in the switch test (fewer worker start-ups, same coverage)."""
    d, ref = refs["deepseek_v2"]
    with LLM(d, ranks=2, layout="tp", max_num_batched_tokens=48) as llm:
        assert tokens(llm) == ref
        mem = llm.engine.memory[0]
        assert mem["kv_blocks_tp"] == mem["kv_blocks_ep"]  # latent replicated under TP


def test_switches_keep_tokens_and_move_latents_only_into_tp(refs):
    d, ref = refs["deepseek_v3"]
    schedule = [(2, "ep"), (5, "tp"), (9, "ep"), (12, "tp")]
    with LLM(d, ranks=2, layout="tp", switch_schedule=schedule, max_num_batched_tokens=16) as llm:
        assert tokens(llm) == ref
        eng = llm.engine
        assert [r.target for r in eng.switches] == ["ep", "tp", "ep", "tp"]
        cfg = eng.cfg.model
        per_token = cfg.num_layers * cfg.head_dim * 4  # one float32 latent per layer
        for rec in eng.switches:
            assert rec.weight_bytes == eng.expected_switch_weight_bytes()
            if rec.target == "ep":
                assert rec.kv_bytes == 0  # the owner already holds the replicated latent
            else:
                assert rec.kv_bytes > 0 and rec.kv_bytes % per_token == 0


def test_switch_into_tp_preempts_when_latents_do_not_fit(refs):
    """EP holds twice TP's latents cluster-wide: a small pool forces preemptions at EP->TP."""
    d, ref = refs["deepseek_v2"]
    with LLM(
        d,
        ranks=2,
        layout="ep",
        num_kv_blocks=14,  # 56 tokens a rank: the longest request (52) fits alone
        block_size=4,
        switch_schedule=[(6, "tp"), (14, "ep")],
    ) as llm:
        assert tokens(llm) == ref
        into_tp = [r for r in llm.engine.switches if r.target == "tp"]
        assert into_tp and into_tp[0].preempted > 0


def test_ep_alltoall_exchange(refs):
    """V3 under EP with all-to-all dispatch (routed experts only; shared ones stay local)."""
    d, ref = refs["deepseek_v3"]
    with LLM(d, ranks=2, layout="ep", ep_exchange="alltoall", max_num_batched_tokens=48) as llm:
        assert tokens(llm) == ref
