"""Two CUDA ranks over NCCL: TP and EP and live switches give single-device tokens (float32,
eager), and the decode CUDA graphs of both layouts (bf16, collectives captured) give the eager
path's tokens across switches, with nothing recaptured."""

from __future__ import annotations

import pytest
import torch

from moebius import LLM, SamplingParams
from tests.conftest import PROMPTS

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"
)

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
UNEVEN = PROMPTS + ["a", "Science, history, music, art, code, mathematics and sport are topics."]
SCHEDULE = [(3, "ep"), (8, "tp"), (13, "ep")]


def tokens(llm, prompts=UNEVEN):
    ids = [llm.tokenizer.encode(p) for p in prompts]
    return [o.outputs[0].token_ids for o in llm.generate(ids, GREEDY)]


@pytest.fixture(scope="module")
def single_fp32(qwen_dir):
    with LLM(qwen_dir, device="cuda", dtype="float32", kv_cache_memory=1 << 30) as llm:
        return tokens(llm)


@pytest.mark.parametrize("layout,schedule", [("tp", []), ("ep", []), ("tp", SCHEDULE)])
def test_two_gpus_match_single_gpu(layout, schedule, single_fp32, qwen_dir):
    with LLM(qwen_dir, device="cuda", dtype="float32", kv_cache_memory=1 << 30, ranks=2,
             layout=layout,
             switch_schedule=schedule, max_num_batched_tokens=48) as llm:
        assert tokens(llm) == single_fp32
        assert len(llm.engine.switches) == len(schedule)


@pytest.mark.parametrize("start", ["tp", "ep"])
def test_graphs_of_both_layouts_match_eager(start, qwen_dir):
    kw = dict(device="cuda", dtype="bfloat16", ranks=2, layout=start, switch_schedule=SCHEDULE,
              kv_cache_memory=1 << 30, max_num_seqs=16)  # buckets 1..16: a quick capture
    with LLM(qwen_dir, enforce_eager=True, **kw) as llm:
        eager = tokens(llm)
    with LLM(qwen_dir, **kw) as llm:
        mem = llm.engine.memory
        assert all(m["graph_buckets"] for m in mem), "ranks > 1 must capture decode graphs"
        graphed = tokens(llm)
        layouts = [start] + [t for _, t in SCHEDULE]
        changes = sum(a != b for a, b in zip(layouts, layouts[1:], strict=False))
        assert len(llm.engine.switches) == changes
    assert graphed == eager
