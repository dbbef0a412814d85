"""GPU paths against the reference (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from moebius.model.moe import experts_grouped, experts_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(params=[True, False], ids=["gemv", "cublas"])
def gemv(request, monkeypatch):
    """The engine with one-token projections through our GEMV (the default) and through
    cuBLAS (``MOEBIUS_GEMV=0``, and every projection of more tokens)."""
    from moebius.model import triton_gemv

    monkeypatch.setattr(triton_gemv, "ENABLED", request.param)
    return request.param


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize(
    "T,P,K,H,c", [(1, 8, 2, 256, 128), (37, 16, 4, 512, 64), (300, 128, 8, 2048, 384),
                  (2000, 128, 8, 512, 64)]
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


def _expert_inputs(T, P, K, H, c, held_only=False):
    g = torch.Generator(device="cuda").manual_seed(T * 7 + K)
    x = torch.randn(T, H, device="cuda", generator=g)
    w13 = torch.randn(P, 2 * c, H, device="cuda", generator=g) * H**-0.5
    w2 = torch.randn(P, c, H, device="cuda", generator=g) * c**-0.5
    low = 0 if held_only else -1  # -1: held by another rank (EP)
    pieces = torch.randint(low, P, (T, K), device="cuda", generator=g)
    wts = torch.rand(T, K, device="cuda", generator=g)
    return x, pieces, wts, w13, w2


@pytest.mark.parametrize(
    "T,P,K,H,c",
    [(1, 128, 8, 2048, 768), (1, 8, 2, 256, 128), (3, 128, 8, 2048, 768), (37, 16, 4, 512, 64),
     (64, 128, 16, 2048, 384),
     (256, 128, 8, 2048, 768), (1000, 128, 8, 1024, 96)],
)
def test_fused_experts_match_reference(T, P, K, H, c):
    from moebius.model.triton_moe import experts_fused

    x, pieces, wts, w13, w2 = _expert_inputs(T, P, K, H, c)
    ref = experts_reference(x.double(), pieces, wts.double(), w13.double(), w2.double())
    out = experts_fused(x.bfloat16(), pieces, wts.bfloat16(), w13.bfloat16(), w2.bfloat16())
    assert torch.isfinite(out).all()
    err = rel(out, ref)
    assert 1e-4 < err < 1e-2, err  # bf16 rounding present, nothing worse


@pytest.mark.parametrize("T,E,K,renorm", [(1, 128, 8, True), (300, 128, 8, False), (33, 8, 2, True),
                                          (5, 60, 4, True)])
def test_triton_routing_matches_torch(T, E, K, renorm):
    from moebius.model.moe import _route_torch
    from moebius.model.triton_moe import route_topk

    g = torch.Generator(device="cuda").manual_seed(E + K)
    x = torch.randn(T, 256, device="cuda", generator=g).bfloat16()
    router = torch.randn(E, 256, device="cuda", generator=g).bfloat16()
    logits = torch.nn.functional.linear(x, router)
    ids, w = route_topk(logits, K, renorm, x.dtype)
    ref_ids, ref_w = _route_torch(x, router, K, renorm)
    # bf16 logits tie often; tied experts may be picked in another order (or the other one
    # of a tie at the k-th place), so compare the probabilities picked, not the ids.
    probs = torch.softmax(logits.float(), -1)
    assert (probs.gather(1, ids) == probs.gather(1, ref_ids)).all()
    assert (ids.sort(1).values.diff(1) != 0).all()  # k distinct experts a token
    same = (ids == ref_ids).all(1)
    assert same.float().mean() > 0.5
    assert torch.allclose(w[same].float(), ref_w[same].float(), rtol=1e-2, atol=1e-3)


def test_fused_experts_replay_in_a_cuda_graph():
    from moebius.model.triton_moe import experts_fused

    x, pieces, wts, w13, w2 = (t.bfloat16() if t.is_floating_point() else t
                               for t in _expert_inputs(8, 128, 8, 1024, 256, held_only=True))
    experts_fused(x, pieces, wts, w13, w2)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = experts_fused(x, pieces, wts, w13, w2)
    for seed in range(3):
        g = torch.Generator(device="cuda").manual_seed(100 + seed)
        x.copy_(torch.randn(x.shape, device="cuda", generator=g))
        pieces.copy_(torch.randint(0, 128, pieces.shape, device="cuda", generator=g))
        graph.replay()
        assert torch.equal(out, experts_fused(x, pieces, wts, w13, w2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nh,kvh", [(32, 4), (8, 8)])
def test_triton_paged_prefill_matches_reference(dtype, nh, kvh):
    """Chunks of odd lengths, some after a cached prefix (start_pos > 0), with decode tokens
    in the same step, against the gather + SDPA reference."""
    from moebius.model import attention as attn
    from moebius.model.attention import AttentionMeta, PrefillChunk, paged_attention

    g = torch.Generator(device="cuda").manual_seed(nh)
    d, bs, NB = 128, 16, 600
    k = torch.randn(NB, bs, kvh, d, device="cuda", generator=g, dtype=dtype)
    v = torch.randn(NB, bs, kvh, d, device="cuda", generator=g, dtype=dtype)
    perm = torch.randperm(NB, device="cuda", generator=g).tolist()
    chunks, dec_idx, dec_tables, dec_lens, T = [], [], [], [], 0
    for start_pos, n in [(0, 1), (0, 130), (48, 77), (0, 3), (500, 64), (17, 200)]:
        nb = (start_pos + n + bs - 1) // bs
        table, perm = perm[:nb], perm[nb:]
        chunks.append(PrefillChunk(T, n, start_pos, torch.tensor(table, device="cuda")))
        T += n
        dec_idx.append(T)  # one decode token after each chunk
        dec_tables.append(perm[:4])
        perm = perm[4:]
        dec_lens.append(40 + len(dec_idx))
        T += 1
    q = torch.randn(T, nh, d, device="cuda", generator=g, dtype=dtype)

    def meta():
        return AttentionMeta(
            torch.zeros(0, dtype=torch.long, device="cuda"),
            torch.tensor(dec_idx, device="cuda"),
            torch.tensor(dec_tables, device="cuda"),
            torch.tensor(dec_lens, device="cuda"),
            chunks,
            max(dec_lens),
        )

    out = paged_attention(q, k, v, meta(), d**-0.5)
    saved, attn._triton_decode = attn._triton_decode, None
    try:
        ref = paged_attention(q.double(), k.double(), v.double(), meta(), d**-0.5)
    finally:
        attn._triton_decode = saved
    assert torch.isfinite(out).all()
    for c in chunks:
        rows = slice(c.token_start, c.token_start + c.num_tokens)
        err = rel(out[rows], ref[rows])
        assert err < (1e-4 if dtype == torch.float32 else 1e-2), (c, err)


def test_engine_on_cuda_matches_cpu(qwen_dir, gemv):
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
    """Split and merged (B 1 and 7), and one split stored by the split kernel itself (B 64)."""
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
    for max_context in (ctx_max, 16 * ctx_max):  # and split for a far longer one (as graphs)
        out = paged_decode_attention(q, k, v, tables, lens, d**-0.5, max_context)
        err = rel(out, ref)
        assert torch.isfinite(out).all()
        assert err < (1e-4 if dtype == torch.float32 else 1e-2), err


def test_cuda_graphs_match_eager(qwen_dir, gemv):
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


def test_one_token_self_routing_matches_aligned_routing(qwen_dir, monkeypatch):
    """Batch-1 decode in CUDA graphs with the gate/up kernel picking the experts itself
    (``MOEBIUS_SELF_ROUTE=1``) gives the tokens and log-probabilities of the top-k +
    alignment launch, bit for bit; with the top-k on a copy of the logits a warp
    (``MOEBIUS_TOPK_ROWS=4``) the same tokens, log-probabilities to rounding."""
    from moebius import LLM, SamplingParams
    from moebius.model import triton_moe
    from tests.conftest import PROMPTS

    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    runs = []
    for route in ("align", "self", "self4"):
        monkeypatch.setattr(triton_moe, "SELF_ROUTE", route != "align")
        monkeypatch.setattr(triton_moe, "TOPK_ROWS", 4 if route == "self4" else 2)
        with LLM(qwen_dir, device="cuda", dtype="bfloat16", num_kv_blocks=256) as llm:
            outs = [llm.generate([llm.tokenizer.encode(p)], sp)[0].outputs[0] for p in PROMPTS]
        runs.append([(o.token_ids, [lp[t].logprob for lp, t in
                                    zip(o.logprobs, o.token_ids, strict=True)]) for o in outs])
    assert runs[0] == runs[1]
    for (ta, la), (tr, lr) in zip(runs[0], runs[2], strict=True):
        assert ta == tr
        assert max(abs(a - b) for a, b in zip(la, lr, strict=True)) < 2e-2


def test_router_fold_kernels_match_float64():
    """One bf16 token at Qwen3-30B-A3B's shapes through the folded launches
    (model/router_fold.py): the residual and normed row of the unfolded add + norm launch,
    picks whose exact logits are within rounding of the top k, weights and expert rows to
    bf16 error against float64."""
    from moebius.model import triton_moe, triton_norm
    from moebius.model.triton_gemv import gemv
    from moebius.model.triton_moe import Fold, Routed, experts_routed

    H, E, K, c, A, R, eps = 2048, 128, 8, 768, 4096, 8, 1e-6
    g = torch.Generator(device="cuda").manual_seed(7)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).bfloat16()

    assert triton_moe.SELF_ROUTE
    w13, w2 = rnd(E, 2 * c, H, scale=H**-0.5), rnd(E, c, H, scale=c**-0.5)
    for trial in range(8):
        x0, parts, attn = rnd(1, H), rnd(1, R, H, scale=0.3), rnd(1, A)
        w_in, w_post = (1 + rnd(H, scale=0.1) for _ in range(2))
        router, o_proj = rnd(E, H, scale=H**-0.5), rnd(H, A, scale=A**-0.5)
        res = router.float() * w_post.float()
        o_route = torch.cat([o_proj, (res @ o_proj.float()).bfloat16()])
        x1, h1 = triton_norm.add_rms_norm(x0, parts, w_in, eps)
        o = gemv(attn, o_proj)
        x2, h2, _ = triton_norm.add_rms_norm_route(x1, o, w_post, eps, router, K, True)
        fx1, fh1, share = triton_norm.add_rms_norm_residual_logits(x0, parts, w_in, eps,
                                                                   res.bfloat16())
        assert torch.equal(fx1, x1) and torch.equal(fh1, h1)
        rows = gemv(attn, o_route)
        assert torch.equal(rows[:, :H], o)
        o_split, part = gemv(attn, o_proj, o_route[H:])  # the share split over o's programs
        assert torch.equal(o_split, o) and part.shape == (1, 512 // E, E)
        assert rel(part.sum(1), rows[:, H:]) < 1e-2
        exact = (router.double() @ h2.double().T).flatten()  # the routing of the normed row
        kth = exact.topk(K).values[-1]
        for o_share in (rows[:, None, H:], part):
            routed = Routed(1, K, E, torch.bfloat16, "cuda", True, logits=share)
            residual = torch.full_like(x1, float("nan"))
            out = experts_routed(x1, routed, w13, w2, fold=Fold(o, o_share, w_post, eps,
                                                                residual))
            assert torch.equal(residual, x2), trial
            assert (exact[routed.ids.flatten()] >= kth - 0.02 * exact.abs().max()).all(), trial
            picked = exact[routed.ids.flatten()].softmax(0)
            assert rel(routed.weights.flatten(), picked) < 1e-2, trial
            ref = experts_reference(h2.double(), routed.ids, routed.weights.double(),
                                    w13.double(), w2.double())
            assert rel(out.sum(1), ref) < 1e-2, trial


@pytest.mark.parametrize("variant", ["split", "rows", "smem_o"])
def test_router_fold_decodes_as_unfolded(qwen_dir, monkeypatch, variant):
    """Batch-1 greedy decode in CUDA graphs with the fold on (the attention's router share
    split over the o GEMV's programs, as more o rows, or as more rows of o held in shared
    memory): the unfolded run's tokens and log-probabilities, except that after a near-tie
    (the unfolded run's two best tokens within 0.05 in log-probability) the two may go
    different ways."""
    from moebius import LLM, SamplingParams
    from moebius.model import gluon_gemv, router_fold
    from tests.conftest import PROMPTS

    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    runs = []
    monkeypatch.setattr(router_fold, "SPLIT", variant == "split")
    monkeypatch.setattr(gluon_gemv, "PROJECTIONS", {"o"} if variant == "smem_o" else set())
    for enabled in (False, True):
        monkeypatch.setattr(router_fold, "ENABLED", enabled)
        with LLM(qwen_dir, device="cuda", dtype="bfloat16", num_kv_blocks=256) as llm:
            layer0 = llm.engine.executor.runner.weights.layers[0]
            assert (layer0.o_route is not None) == enabled
            runs.append([llm.generate([llm.tokenizer.encode(p)], sp)[0].outputs[0]
                         for p in PROMPTS])
    assert_agree_but_near_ties(*runs)


def assert_agree_but_near_ties(plain_runs, other_runs, max_tokens=12):
    """Greedy outputs of two differently-rounding paths: the same tokens and log-probabilities,
    except that after a near-tie (the plain run's two best tokens within 0.05 in
    log-probability) the two may go different ways; at least half the tokens agree."""
    agreed = 0
    for plain, other in zip(plain_runs, other_runs, strict=True):
        for lp_a, lp_b, ta, tb in zip(plain.logprobs, other.logprobs, plain.token_ids,
                                      other.token_ids, strict=True):
            if ta != tb:
                best = sorted((lp.logprob for lp in lp_a.values()), reverse=True)
                assert best[0] - best[1] < 0.05, (plain.token_ids, other.token_ids)
                break
            assert abs(lp_a[ta].logprob - lp_b[tb].logprob) < 2e-2
            agreed += 1
    assert agreed >= len(plain_runs) * max_tokens // 2


def test_shared_memory_gemv_decodes_as_register_gemv(qwen_dir, monkeypatch):
    """Greedy decode in CUDA graphs, one request at a time and all at once (a few tokens a
    step), with the projections held in shared memory (model/gluon_gemv.py) and every kernel
    on the largest shared-memory carve-out: the register GEMV's and cuBLAS's tokens and
    log-probabilities, but for near-ties."""
    from moebius import LLM, SamplingParams
    from moebius.model import gluon_gemv, triton_pdl
    from tests.conftest import PROMPTS

    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    runs = []
    for smem in (False, True):
        monkeypatch.setattr(gluon_gemv, "PROJECTIONS", {"qkv", "o"} if smem else set())
        monkeypatch.setattr(triton_pdl, "SHARED_CARVEOUT", smem)
        with LLM(qwen_dir, device="cuda", dtype="bfloat16", num_kv_blocks=256) as llm:
            ids = [llm.tokenizer.encode(p) for p in PROMPTS]
            alone = [llm.generate([i], sp)[0].outputs[0] for i in ids]
            runs.append(alone + [o.outputs[0] for o in llm.generate(ids, sp)])
        assert (triton_pdl.prefer_shared_memory() > 0) == smem
    assert_agree_but_near_ties(*runs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,nh,ctx_max", [(1, 16, 900), (9, 20, 130), (64, 128, 40)])
def test_triton_mla_decode_matches_reference(dtype, B, nh, ctx_max):
    from moebius.model import mla
    from moebius.model.attention import AttentionMeta
    from moebius.model.triton_mla import paged_mla_decode

    g = torch.Generator(device="cuda").manual_seed(B)
    r, dr, bs, NB = 512, 64, 16, 700
    cache = torch.randn(NB, bs, 1, r + dr, device="cuda", generator=g, dtype=dtype)
    q = torch.randn(B, nh, r + dr, device="cuda", generator=g, dtype=dtype) * 0.1
    lens = torch.randint(1, ctx_max + 1, (B,), device="cuda", generator=g)
    width = (ctx_max + bs - 1) // bs
    tables = torch.randperm(NB, device="cuda", generator=g)[: B * width].view(B, width)
    out = paged_mla_decode(q, cache, tables, lens, 0.07, ctx_max, r)
    meta = AttentionMeta(torch.zeros(0, dtype=torch.long, device="cuda"),
                         torch.arange(B, device="cuda"), tables, lens, [], ctx_max)
    saved, mla.triton_mla = mla.triton_mla, None
    try:
        ref = mla.latent_attention(q.double(), cache.double(), meta, 0.07, r)
    finally:
        mla.triton_mla = saved
    assert torch.isfinite(out).all()
    assert rel(out, ref) < (1e-4 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_mla_cuda_graphs_match_eager(arch, tmp_path):
    """DeepSeek decode replayed from CUDA graphs (Triton MLA kernel: rope dims 16, latent 64)
    gives the eager run's tokens."""
    from moebius import LLM, SamplingParams
    from moebius.model.tiny import write_tiny_checkpoint
    from tests.conftest import PROMPTS

    path = write_tiny_checkpoint(str(tmp_path / arch), arch, seed=5, kv_lora_rank=64,
                                 qk_rope_head_dim=16)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    kw = dict(device="cuda", dtype="bfloat16", num_kv_blocks=256)
    with LLM(path, enforce_eager=True, **kw) as eager, LLM(path, **kw) as graphed:
        assert graphed.engine.memory[0]["graph_buckets"]
        ids = [eager.tokenizer.encode(p) for p in PROMPTS]
        a = [o.outputs[0].token_ids for o in eager.generate(ids, sp)]
        b = [o.outputs[0].token_ids for o in graphed.generate(ids, sp)]
    assert a == b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("T", [37, 5001])
def test_fused_qk_norm_rope_write_matches_reference(dtype, norm, T):
    """One launch for q/k RMSNorm, rotary and the KV write against ops.rms_norm, Rotary and
    attention.write_kv, on q/k/v views of one qkv GEMM output; a token a program (37) and
    blocks of 16 with a partial last one (5001)."""
    from moebius.model.attention import write_kv
    from moebius.model.ops import Rotary, rms_norm
    from moebius.model.triton_qk import qk_norm_rope_write

    g = torch.Generator(device="cuda").manual_seed(3)
    nh, kvh, d, NB, bs = 32, 4, 128, 320, 16
    qkv = torch.randn(T, (nh + 2 * kvh) * d, device="cuda", generator=g, dtype=dtype)
    q, k, v = qkv.split([nh * d, kvh * d, kvh * d], -1)
    q, k, v = q.view(T, nh, d), k.view(T, kvh, d), v.view(T, kvh, d)
    qn = (torch.rand(d, device="cuda", generator=g) + 0.5).to(dtype)
    kn = (torch.rand(d, device="cuda", generator=g) + 0.5).to(dtype)
    rot = Rotary(d, 1e6, 4096, "cuda")
    pos = torch.randint(0, 4096, (T,), device="cuda", generator=g)
    slots = torch.randperm(NB * bs, device="cuda", generator=g)[:T]
    caches = [torch.zeros(NB, bs, kvh, d, device="cuda", dtype=dtype) for _ in range(4)]
    qq, kk = (rms_norm(q, qn, 1e-6), rms_norm(k, kn, 1e-6)) if norm else (q, k)
    ref_q, ref_k = rot.apply(qq, pos), rot.apply(kk, pos)
    write_kv(caches[0], caches[1], ref_k, v, slots)
    out = qk_norm_rope_write(q, k, v, qn if norm else None, kn if norm else None, 1e-6,
                             rot.cos, rot.sin, pos, caches[2], caches[3], slots)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel(out, ref_q) < tol and rel(caches[2], caches[0]) < tol
    assert torch.equal(caches[3], caches[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,R,H", [(1, 0, 2048), (1, 1, 2048), (5, 8, 2048), (300, 8, 7168),
                                   (3, 2, 100)])
def test_add_rms_norm_matches_eager_ops(dtype, T, R, H):
    """The residual add (+ the sum over R part rows) and the norm in one launch, against the
    eager ops it replaces; the bf16 residual is bit-exact (same rounding steps)."""
    from moebius.model import triton_norm
    from moebius.model.ops import rms_norm

    g = torch.Generator(device="cuda").manual_seed(T * 31 + R)
    x = torch.randn(T, H, device="cuda", generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(H, device="cuda", generator=g)).to(dtype)
    parts = None if R == 0 else torch.randn(T, R, H, device="cuda", generator=g).to(dtype)
    if R == 1:
        parts = parts[:, 0]
    ref_x = x if parts is None else x + (parts if R == 1 else parts.sum(1))
    ref = rms_norm(ref_x.double(), w.double(), 1e-6)
    xo, out = triton_norm.add_rms_norm(x, parts, w, 1e-6)
    assert torch.isfinite(out).all()
    assert rel(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    if dtype == torch.bfloat16:
        assert torch.equal(xo, ref_x)
    else:
        assert rel(xo, ref_x) < 1e-6


@pytest.mark.parametrize("T,R,E,K,renorm,route", [
    (1, 8, 128, 8, True, "align"), (1, 8, 128, 8, True, "self"), (1, 0, 8, 2, False, "self"),
    (1, 0, 60, 4, False, "self"), (1, 8, 128, 8, True, "self4"), (3, 8, 128, 8, True, "align"),
    (16, 8, 128, 8, True, "align"), (7, 1, 8, 2, True, "align"), (4, 0, 60, 4, False, "align")])
def test_norm_routes_then_aligns(T, R, E, K, renorm, route, monkeypatch):
    """The add + norm + router launch, then top-k + alignment in one more launch (or, at one
    token, in the gate/up kernel: "self"; on a copy of the logits a warp, MOEBIUS_TOPK_ROWS=4:
    "self4", whose weights may differ from route_topk's by a rounding): the norm's outputs are
    add_rms_norm's bit for bit, the logits the router GEMM's up to bf16 rounding, top-k and
    the experts' rows those of the separate kernels on those logits bit for bit, close to the
    float64 reference; replayed in a graph on fresh inputs too."""
    from moebius.model import triton_moe, triton_norm
    from moebius.model.triton_moe import experts_fused, experts_routed, route_topk

    monkeypatch.setattr(triton_moe, "SELF_ROUTE", route != "align")
    monkeypatch.setattr(triton_moe, "TOPK_ROWS", 4 if route == "self4" else 2)

    H, c = 2048, 128
    g = torch.Generator(device="cuda").manual_seed(T * 13 + E + R)
    x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
    w = (1 + 0.1 * torch.randn(H, device="cuda", generator=g)).bfloat16()
    router = (torch.randn(E, H, device="cuda", generator=g) * H**-0.5).bfloat16()
    parts = None if R == 0 else torch.randn(T, R, H, device="cuda", generator=g).bfloat16()
    w13 = (torch.randn(E, 2 * c, H, device="cuda", generator=g) * H**-0.5).bfloat16()
    w2 = (torch.randn(E, c, H, device="cuda", generator=g) * c**-0.5).bfloat16()

    def check(xo2, out2, routed):
        xo, out = triton_norm.add_rms_norm(x, parts, w, 1e-6)
        assert torch.equal(xo, xo2) and torch.equal(out, out2)
        assert rel(routed.logits, out.double() @ router.double().T) < 1e-2
        assert routed.one == (route != "align")
        rows = experts_routed(out, routed, w13, w2)  # (at one token it fills ids and weights)
        ids, wts = route_topk(routed.logits, K, renorm, x.dtype)
        assert torch.equal(routed.ids, ids)
        if route == "self4":  # another reduction order for the softmax's sum
            assert rel(routed.weights, wts) < 1e-2
            wts = routed.weights
        assert torch.equal(routed.weights, wts)
        assert torch.equal(rows, experts_fused(out, ids, wts, w13, w2, reduce=False))
        ref = experts_reference(out.double(), ids, wts.double(), w13.double(), w2.double())
        assert rel(rows.sum(1), ref) < 1e-2

    check(*triton_norm.add_rms_norm_route(x, parts, w, 1e-6, router, K, renorm))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = triton_norm.add_rms_norm_route(x, parts, w, 1e-6, router, K, renorm)
    for seed in range(3):
        g.manual_seed(200 + seed)
        x.copy_(torch.randn(T, H, device="cuda", generator=g))
        graph.replay()
        check(*replayed)


@pytest.mark.parametrize("T,P,K", [(300, 128, 8), (2048, 128, 8), (77, 8, 2)])
def test_grouped_expert_rows_summed_in_the_norm(T, P, K):
    """One rank's prefill: grouped GEMM rows left in expert order, weighted, gathered and
    summed inside the add + norm launch, against the summed path and the reference."""
    from moebius.model import triton_norm
    from moebius.model.ops import ExpertRows, rms_norm

    H, c = 1024, 256
    x, pieces, wts, w13, w2 = (t.bfloat16() if t.is_floating_point() else t
                               for t in _expert_inputs(T, P, K, H, c, held_only=True))
    res = torch.randn(T, H, device="cuda").bfloat16()
    nw = (1 + 0.1 * torch.randn(H, device="cuda")).bfloat16()
    rows = experts_grouped(x, pieces, wts, w13, w2, reduce=False)
    assert isinstance(rows, ExpertRows)
    summed = experts_grouped(x, pieces, wts, w13, w2)
    assert rel(rows.sum(), summed) < 1e-3  # the same products, summed in another order
    xo, out = triton_norm.add_rms_norm(res, rows, nw, 1e-6)
    want_x, want = triton_norm.add_rms_norm(res, summed, nw, 1e-6)
    assert rel(xo, want_x) < 1e-2 and rel(out, want) < 1e-2
    ref = experts_reference(x.double(), pieces, wts.double(), w13.double(), w2.double())
    ref_x = res.double() + ref
    assert rel(xo, ref_x) < 1e-2
    assert rel(out, rms_norm(ref_x, nw.double(), 1e-6)) < 1e-2


def check_projection(gemv, usable, T: int, N: int, K: int) -> torch.Tensor:
    """``gemv`` of T tokens against float64 on a whole weight and a column slice of a larger
    one (TP head slices), eager and replayed in a graph; ``usable(x, w)`` must say True.
    Returns the last weight."""
    g = torch.Generator(device="cuda").manual_seed(T * 7 + N + K)
    x = torch.randn(T, K, device="cuda", generator=g).bfloat16()
    whole = (torch.randn(N + 8, K + 64, device="cuda", generator=g) * K**-0.5).bfloat16()
    for w in (whole[:N, :K].contiguous(), whole[8:, 64:]):
        assert usable(x, w)
        y = gemv(x, w)
        assert y.shape == (T, N)
        err = rel(y, x.double() @ w.double().T)
        assert 1e-4 < err < 1e-2, err  # bf16 output rounding, nothing worse
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = gemv(x, w)
        x.copy_(torch.randn(T, K, device="cuda", generator=g))
        graph.replay()
        assert torch.equal(replayed, gemv(x, w))
    return w


@pytest.mark.parametrize("T,N,K", [(1, 5120, 2048), (4, 2048, 4096), (3, 640, 2048), (2, 100, 300)])
def test_gemv_matches_reference(T, N, K, monkeypatch):
    """The weight-prefetching GEMV (registers) of a few tokens (it is used for one)."""
    from moebius.model import triton_gemv

    monkeypatch.setattr(triton_gemv, "ENABLED", True)
    fits = K <= triton_gemv.SLAB and T <= triton_gemv.MAX_TOKENS
    check_projection(triton_gemv.gemv, lambda x, w: triton_gemv.usable(x, w) == fits, T, N, K)


@pytest.mark.parametrize("N,K", [(5120, 2048), (2048, 4096), (2560, 2048), (200, 320)])
@pytest.mark.parametrize("T", [1, 3, 8])
def test_shared_memory_gemv_matches_reference(T, N, K, monkeypatch):
    """The GEMV that holds its weight in shared memory (TMA, one wave) for T tokens; rows
    16-byte aligned; only the projections turned on take it."""
    from moebius.model import gluon_gemv

    monkeypatch.setattr(gluon_gemv, "PROJECTIONS", {"o"})
    w = check_projection(gluon_gemv.gemv, lambda x, w: gluon_gemv.usable(x, w, "o")
                         and not gluon_gemv.usable(x, w, "qkv"), T, N, K)
    too_many = torch.zeros(gluon_gemv.MAX_TOKENS + 1, K, device="cuda").bfloat16()
    assert not gluon_gemv.usable(too_many, w, "o")


@pytest.mark.parametrize("M,c", [(1, 768), (4099, 768), (300, 100)])
def test_gated_activation_matches_reference(M, c):
    """SiLU(gate)·up of grouped-GEMM rows (triton_gated) against float64, and against the
    compiled kernel it replaces to bf16 rounding; a strided view as input too."""
    from moebius.model.moe import _gated
    from moebius.model.triton_gated import silu_mul

    g = torch.Generator(device="cuda").manual_seed(M)
    h = torch.randn(M, 2 * c + 8, device="cuda", generator=g).bfloat16()[:, : 2 * c]
    out = silu_mul(h)
    hd = h.double()
    ref = torch.nn.functional.silu(hd[:, :c]) * hd[:, c:]
    assert rel(out, ref) < 1e-2
    assert (out.double() - _gated(h).double()).abs().max() <= 2**-6 * ref.abs().max()


@pytest.mark.parametrize("M,P", [(1, 8), (3000, 128), (65536, 128), (131072, 256)])
def test_pair_sort_matches_argsort(M, P):
    """The counting sort of a prefill's (token, piece) pairs: torch's stable argsort bit for
    bit, its inverse, the groups' ends, with pieces not held (P) among them."""
    from moebius.model.triton_sort import sort_pairs

    g = torch.Generator(device="cuda").manual_seed(M)
    pieces = torch.randint(0, P + 1, (M,), device="cuda", generator=g)
    order, inv, ends = sort_pairs(pieces, P)
    assert torch.equal(order, torch.argsort(pieces, stable=True))
    assert torch.equal(inv[order], torch.arange(M, device="cuda"))
    counts = torch.bincount(pieces, minlength=P + 1)[:P]
    assert torch.equal(ends, counts.cumsum(0).int())


@pytest.mark.parametrize("B,V", [(1, 151936), (5, 1000), (300, 151936)])
@pytest.mark.parametrize("fused_filter", [False, True])
def test_fused_gumbel_draw_matches_eager(B, V, fused_filter, monkeypatch):
    """sampler.sample with the fused Triton draw (and with the sort-free filter) gives the
    eager path's tokens, for a batch mixing greedy, temperature-only and filtered (top-k,
    top-p, min-p) rows."""
    from moebius.model import sampler
    from moebius.model.sampler import SamplingTensors

    g = torch.Generator(device="cuda").manual_seed(B)
    logits = torch.randn(B, V, device="cuda", generator=g) * 4
    kind = torch.arange(B, device="cuda") % 4  # 0 greedy, 1 temperature, 2 top-p, 3 top-k
    st = SamplingTensors(
        temperature=torch.where(kind == 0, 0.0, 0.7 + 0.1 * kind),
        top_k=torch.where(kind == 3, 50, 0),
        top_p=torch.where(kind == 2, 0.9, 1.0),
        min_p=torch.where(kind == 3, 0.01, 0.0),
        seeds=torch.randint(0, 2**62, (B,), device="cuda", generator=g),
        steps=torch.randint(0, 10**6, (B,), device="cuda", generator=g),
        need_filter=True,
        all_greedy=False,
    )
    monkeypatch.setattr(sampler, "FUSED_DRAW", False)
    eager = sampler.sample(logits, st)
    monkeypatch.setattr(sampler, "FUSED_DRAW", True)
    monkeypatch.setattr(sampler, "FUSED_FILTER", fused_filter)
    assert torch.equal(sampler.sample(logits, st), eager)


@pytest.mark.parametrize("T,P,K,reduce", [(2000, 128, 8, False), (1500, 128, 8, True),
                                          (300, 60, 4, True)])
def test_fused_experts_with_prefill_tiles_match_reference(T, P, K, reduce):
    """triton_moe_large (MOEBIUS_MOE_LARGE=fused) against the float64 reference: summed with
    pieces held elsewhere (-1) among them, or as the (T, K, H) rows at one rank; replayed in a
    CUDA graph on fresh inputs too."""
    from moebius.model.triton_moe_large import experts_fused_large

    x, pieces, wts, w13, w2 = _expert_inputs(T, P, K, 2048, 768, held_only=not reduce)
    x, wts, w13, w2 = x.bfloat16(), wts.bfloat16(), w13.bfloat16(), w2.bfloat16()
    ref = experts_reference(x.double(), pieces, wts.double(), w13.double(), w2.double())
    out = experts_fused_large(x, pieces, wts, w13, w2, reduce=reduce)
    assert torch.isfinite(out).all()
    assert rel(out if reduce else out.sum(1), ref) < 1e-2
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        replayed = experts_fused_large(x, pieces, wts, w13, w2, reduce=reduce)
    x.copy_(torch.randn_like(x))
    pieces.copy_(pieces.flip(0))
    g.replay()
    ref = experts_reference(x.double(), pieces, wts.double(), w13.double(), w2.double())
    assert rel(replayed if reduce else replayed.sum(1), ref) < 1e-2
