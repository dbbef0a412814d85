"""GPU paths against the reference (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from moebius.model.moe import experts_grouped, experts_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize(
    "T,P,K,H,c", [(1, 8, 2, 256, 128), (37, 16, 4, 512, 64), (300, 128, 8, 2048, 384)]
)
def test_grouped_experts_match_reference(T, P, K, H, c):
    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, H, device="cuda", generator=g)
    w13 = torch.randn(P, 2 * c, H, device="cuda", generator=g) * H**-0.5
    w2 = torch.randn(P, c, H, device="cuda", generator=g) * c**-0.5
    pieces = torch.randint(-1, P, (T, K), device="cuda", generator=g)  # -1: held elsewhere
    wts = torch.rand(T, K, device="cuda", generator=g)
    ref = experts_reference(x.double(), pieces, wts.double(), w13.double(), w2.double())
    out = experts_grouped(x.bfloat16(), pieces, wts.bfloat16(), w13.bfloat16(), w2.bfloat16())
    assert torch.isfinite(out).all()
    assert rel(out, ref) < 1e-2


def test_engine_on_cuda_matches_cpu(qwen_dir):
    from moebius import LLM, SamplingParams
    from tests.conftest import PROMPTS

    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    with (
        LLM(qwen_dir) as cpu,
        LLM(qwen_dir, device="cuda", dtype="float32", num_kv_blocks=256) as gpu,
    ):
        ids = [cpu.tokenizer.encode(p) for p in PROMPTS]
        a = [o.outputs[0].token_ids for o in cpu.generate(ids, sp)]
        b = [o.outputs[0].token_ids for o in gpu.generate(ids, sp)]
    assert a == b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,nh,kvh,ctx_max", [(1, 32, 4, 700), (7, 16, 2, 130), (64, 4, 4, 33)])
def test_triton_paged_decode_matches_reference(dtype, B, nh, kvh, ctx_max):
    from moebius.model.attention import AttentionMeta, paged_attention
    from moebius.model.triton_attention import paged_decode_attention

    g = torch.Generator(device="cuda").manual_seed(B)
    d, bs, NB = 128, 16, 400
    k = torch.randn(NB, bs, kvh, d, device="cuda", generator=g, dtype=dtype)
    v = torch.randn(NB, bs, kvh, d, device="cuda", generator=g, dtype=dtype)
    q = torch.randn(B, nh, d, device="cuda", generator=g, dtype=dtype)
    lens = torch.randint(1, ctx_max + 1, (B,), device="cuda", generator=g)
    width = (ctx_max + bs - 1) // bs
    tables = torch.randperm(NB, device="cuda", generator=g)[: B * width].view(B, width)
    out = paged_decode_attention(q, k, v, tables, lens, d**-0.5, ctx_max)
    meta = AttentionMeta(
        torch.zeros(0, dtype=torch.long, device="cuda"),
        torch.arange(B, device="cuda"),
        tables,
        lens,
        [],
        ctx_max,
    )
    import moebius.model.attention as attn

    saved, attn._triton_decode = attn._triton_decode, None
    try:
        ref = paged_attention(q.double(), k.double(), v.double(), meta, d**-0.5)
    finally:
        attn._triton_decode = saved
    err = rel(out, ref)
    assert torch.isfinite(out).all()
    assert err < (1e-4 if dtype == torch.float32 else 1e-2), err


def test_cuda_graphs_match_eager(qwen_dir):
    from moebius import LLM, SamplingParams
    from tests.conftest import PROMPTS

    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    kw = dict(device="cuda", dtype="bfloat16", num_kv_blocks=256)
    with LLM(qwen_dir, enforce_eager=True, **kw) as eager, LLM(qwen_dir, **kw) as graphed:
        assert graphed.engine.memory[0]["graph_buckets"]
        assert not eager.engine.memory[0]["graph_buckets"]
        ids = [eager.tokenizer.encode(p) for p in PROMPTS]
        a = [o.outputs[0] for o in eager.generate(ids, sp)]
        b = [o.outputs[0] for o in graphed.generate(ids, sp)]
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        for lx, ly, t in zip(x.logprobs, y.logprobs, x.token_ids, strict=True):
            assert abs(lx[t].logprob - ly[t].logprob) < 2e-2
