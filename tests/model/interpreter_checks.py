"""Triton kernels run by Triton's interpreter on the CPU (float32), against the reference ops.

Run as ``TRITON_INTERPRET=1 python tests/model/interpreter_checks.py NAME`` (the variable must
be set before the kernels are defined, so test_triton_interpreter.py starts a process a
check). The GPU tests (test_gpu_kernels.py) check the same kernels compiled, in bf16 too; these
catch a broken kernel on machines without a GPU.
"""

from __future__ import annotations

import sys

import torch

from moebius.model.attention import write_kv
from moebius.model.moe import _route_torch, experts_reference
from moebius.model.ops import Rotary, rms_norm


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def qk_norm_rope_write() -> None:
    """triton_qk against rms_norm, Rotary and write_kv."""
    from moebius.model.triton_qk import qk_norm_rope_write

    d, nh, kvh = 32, 4, 2
    for T in (3, 1537):  # a token a program; blocks of 4, the last partial
        q, k, v = torch.randn(T, nh, d), torch.randn(T, kvh, d), torch.randn(T, kvh, d)
        qn, kn = 1 + 0.1 * torch.randn(d), 1 + 0.1 * torch.randn(d)
        rot = Rotary(d, 1e6, 512, "cpu")
        pos, slots = torch.randint(0, 512, (T,)), torch.randperm(128 * 16)[:T]
        kc, vc = torch.zeros(128, 16, kvh, d), torch.zeros(128, 16, kvh, d)
        out = qk_norm_rope_write(q, k, v, qn, kn, 1e-6, rot.cos, rot.sin, pos, kc, vc, slots)
        kr, vr = torch.zeros_like(kc), torch.zeros_like(vc)
        write_kv(kr, vr, rot.apply(rms_norm(k, kn, 1e-6), pos), v, slots)
        assert rel(out, rot.apply(rms_norm(q, qn, 1e-6), pos)) < 1e-5
        assert rel(kc, kr) < 1e-5 and torch.equal(vc, vr)


def norm_route_align_experts() -> None:
    """The add + norm + router launch, top-k + alignment, the two expert GEMMs on that plan
    (and, at one token, with the gate/up kernel picking the experts), and the three-launch
    experts_fused, against the reference."""
    from moebius.model import triton_moe, triton_norm
    from moebius.model.triton_moe import experts_fused, experts_routed, route_topk

    g = torch.Generator().manual_seed(2)
    for T, R, E, K, renorm in [(1, 8, 128, 8, True), (3, 8, 16, 4, True), (5, 0, 12, 2, False),
                               (1, 0, 8, 2, False)]:
        H, c = 128, 64
        x, w = torch.randn(T, H, generator=g), 1 + 0.1 * torch.randn(H, generator=g)
        router = torch.randn(E, H, generator=g) * H**-0.5
        parts = None if R == 0 else torch.randn(T, R, H, generator=g)
        w13 = torch.randn(E, 2 * c, H, generator=g) * H**-0.5
        w2 = torch.randn(E, c, H, generator=g) * c**-0.5
        triton_moe.SELF_ROUTE = False  # first the top-k + alignment launch
        xo, h, routed = triton_norm.add_rms_norm_route(x, parts, w, 1e-6, router, K, renorm)
        ref_x = x if parts is None else x + parts.sum(1)
        assert rel(xo, ref_x) < 1e-6 and rel(h, rms_norm(ref_x, w, 1e-6)) < 1e-6
        assert rel(routed.logits, h @ router.T) < 1e-5
        ids, wts = route_topk(routed.logits, K, renorm, x.dtype)
        want_ids, want_w = _route_torch(h, router, K, renorm)
        assert torch.equal(routed.ids, ids) and torch.equal(ids, want_ids)
        assert torch.equal(routed.weights, wts) and rel(wts, want_w) < 1e-6
        plan = routed.plan  # every (token, k) pair once, in a block of its expert
        rows, seen = plan.sorted_rows.view(-1, 16), []
        for blk in range(plan.num_blocks):
            for r in rows[blk].tolist():
                if r < T * K:
                    assert plan.block_piece[blk].item() == ids.flatten()[r].item()
                    seen.append(r)
        assert sorted(seen) == list(range(T * K))
        ref = experts_reference(h.double(), ids, wts.double(), w13.double(), w2.double())
        rows = experts_routed(h, routed, w13, w2)
        assert rel(rows.sum(1), ref) < 1e-5
        assert rel(experts_fused(h, ids, wts, w13, w2), ref) < 1e-5
        if T == 1:  # the gate/up kernel picks the experts itself: the same rows, ids, weights
            triton_moe.SELF_ROUTE = True
            routed = triton_norm.add_rms_norm_route(x, parts, w, 1e-6, router, K, renorm)[2]
            assert routed.one
            assert torch.equal(experts_routed(h, routed, w13, w2), rows)
            assert torch.equal(routed.ids, ids) and torch.equal(routed.weights, wts)
            triton_moe.TOPK_ROWS = 4  # the top-k on a copy of the logits a warp
            routed = triton_norm.add_rms_norm_route(x, parts, w, 1e-6, router, K, renorm)[2]
            assert torch.equal(experts_routed(h, routed, w13, w2), rows)
            assert torch.equal(routed.ids, ids) and torch.equal(routed.weights, wts)
            triton_moe.TOPK_ROWS = 2


def router_fold() -> None:
    """One token with the post-attention add + norm + router folded into the input norm's
    launch, E more o rows and the gate/up kernel (model/router_fold.py), against the unfolded
    launches: the same residuals, normed row, picks and expert rows."""
    from moebius.model import triton_moe, triton_norm
    from moebius.model.triton_gemv import gemv
    from moebius.model.triton_moe import Fold, Routed, experts_routed

    g = torch.Generator().manual_seed(5)
    triton_moe.SELF_ROUTE = True
    for R, E, K, renorm in [(8, 16, 4, True), (0, 12, 2, False)]:
        H, c, A, eps = 128, 64, 96, 1e-6
        x0 = torch.randn(1, H, generator=g)
        parts = None if R == 0 else torch.randn(1, R, H, generator=g)
        w_in, w_post = (1 + 0.1 * torch.randn(H, generator=g) for _ in range(2))
        router = torch.randn(E, H, generator=g) * H**-0.5
        o_proj = torch.randn(H, A, generator=g) * A**-0.5
        attn = torch.randn(1, A, generator=g)
        w13 = torch.randn(E, 2 * c, H, generator=g) * H**-0.5
        w2 = torch.randn(E, c, H, generator=g) * c**-0.5
        x1, h1 = triton_norm.add_rms_norm(x0, parts, w_in, eps)
        x2, h2, routed = triton_norm.add_rms_norm_route(x1, attn @ o_proj.T, w_post, eps, router,
                                                        K, renorm)
        rows = experts_routed(h2, routed, w13, w2)
        res = router * w_post
        fx1, fh1, share = triton_norm.add_rms_norm_residual_logits(x0, parts, w_in, eps, res)
        assert torch.equal(fx1, x1) and torch.equal(fh1, h1)
        assert rel(share, x1 @ res.T) < 1e-6
        attn_rows = attn @ torch.cat([o_proj, res @ o_proj]).T
        o, part = gemv(attn, o_proj, res @ o_proj)  # the share split over the o programs
        assert rel(o, attn_rows[:, :H]) < 1e-6 and rel(part.sum(1), attn_rows[:, H:]) < 1e-5
        for o_share in (attn_rows[:, None, H:], part):
            folded = Routed(1, K, E, x0.dtype, "cpu", renorm, logits=share)
            residual = torch.full_like(x0, float("nan"))
            frows = experts_routed(fx1, folded, w13, w2, fold=Fold(
                attn_rows[:, :H], o_share, w_post, eps, residual))
            assert rel(residual, x2) < 1e-6
            assert torch.equal(folded.ids, routed.ids), (folded.ids, routed.ids)
            assert rel(folded.weights, routed.weights) < 1e-5
            assert rel(frows, rows) < 1e-5


def gated() -> None:
    """SiLU(gate)·up of grouped-GEMM rows against the eager ops."""
    from moebius.model.triton_gated import silu_mul

    h = torch.randn(37, 2 * 300 + 4)[:, :600]
    assert rel(silu_mul(h), torch.nn.functional.silu(h[:, :300]) * h[:, 300:]) < 1e-6


def sort_pairs() -> None:
    """The counting sort of (token, piece) pairs: torch's stable argsort, its inverse, the
    groups' ends; several chunks, pieces not held (P) among them."""
    from moebius.model.triton_sort import sort_pairs

    g = torch.Generator().manual_seed(4)
    for M, P in [(1, 4), (5, 8), (1024, 16), (3000, 128), (2500, 60), (5000, 1000)]:
        pieces = torch.randint(0, P + 1, (M,), generator=g)
        order, inv, ends = sort_pairs(pieces, P)
        assert torch.equal(order, torch.argsort(pieces, stable=True))
        assert torch.equal(inv[order], torch.arange(M))
        assert torch.equal(ends, torch.bincount(pieces, minlength=P + 1)[:P].cumsum(0).int())


def gumbel_max() -> None:
    """The fused Gumbel-max draw against the sampler's eager noise and argmax: the same
    tokens (rows in several slices, filtered tokens at -inf, seeds of any int64)."""
    from moebius.model.sampler import uniform_noise
    from moebius.model.triton_sample import gumbel_max

    g = torch.Generator().manual_seed(6)
    for B, V in [(3, 5000), (1, 2048), (2, 100)]:
        scaled = torch.randn(B, V, generator=g) * 3
        scaled[scaled < -4] = float("-inf")
        seeds = torch.randint(-2**62, 2**62, (B,), generator=g)
        steps = torch.randint(0, 10**6, (B,), generator=g)
        noise = -torch.log(-torch.log(uniform_noise(seeds, steps, V)))
        assert torch.equal(gumbel_max(scaled, seeds, steps), (scaled.double() + noise).argmax(-1))


def filtered_draw() -> None:
    """The sort-free top-k/top-p/min-p draw against the sampler's sort filter and eager draw:
    the same tokens, rows with every filter and none, ties (bfloat16-rounded logits)."""
    from moebius.model.sampler import SamplingTensors, _filter, uniform_noise
    from moebius.model.triton_sample import filtered_draw

    g = torch.Generator().manual_seed(8)
    B, V = 12, 3000
    scaled = (torch.randn(B, V, generator=g) * 3).bfloat16().float()
    scaled[:2, :2500] = float("-inf")  # masked tokens, a whole first block of them
    st = SamplingTensors(
        temperature=torch.ones(B),
        top_k=torch.tensor([0, 1, 5, 50, 0, 0, 0, 20, 0, 3000, 0, 7]),
        top_p=torch.tensor([1.0, 1, 1, 1, 0.9, 0.3, 1, 0.8, 0.05, 1, 0.999, 0.5]),
        min_p=torch.tensor([0.0, 0, 0, 0, 0, 0, 0.1, 0.01, 0, 0, 0, 0.2]),
        seeds=torch.randint(-2**62, 2**62, (B,), generator=g),
        steps=torch.randint(0, 10**6, (B,), generator=g),
        need_filter=True, all_greedy=False)
    noise = -torch.log(-torch.log(uniform_noise(st.seeds, st.steps, V)))
    for _ in range(3):
        ref = (_filter(scaled, st).double() + noise).argmax(-1)
        got = filtered_draw(scaled, st.top_k, st.top_p, st.min_p, st.seeds, st.steps)
        assert torch.equal(got, ref), (got, ref)
        st.steps += 1
        noise = -torch.log(-torch.log(uniform_noise(st.seeds, st.steps, V)))


def restricted_draw() -> None:
    """allowed_token_ids and logit_bias (sampler.apply_logit_rules) then the fused draws, as
    sample() runs them on CUDA: rows whose few kept tokens leave whole slices at -inf, the
    same tokens as the eager draw and filter, every one among the kept."""
    from moebius.model.sampler import SamplingTensors, _filter, apply_logit_rules, uniform_noise
    from moebius.model.triton_sample import filtered_draw, gumbel_max

    g = torch.Generator().manual_seed(9)
    B, V = 4, 5000
    logits = torch.randn(B, V, generator=g) * 3
    allowed = [[7, 4999], [2500, 2501, 2502], [100], list(range(0, V, 97))]
    at = [j for j, ids in enumerate(allowed) for _ in ids]
    flat = [t for ids in allowed for t in ids]
    t = torch.tensor
    apply_logit_rules(logits, torch.arange(B), t(at), t(flat), t([0, 1, 3]), t([4999, 2502, 97]),
                      t([-5.0, 8.0, 100.0]))
    st = SamplingTensors(temperature=torch.full((B,), 0.7), top_k=t([0, 2, 0, 3]),
                         top_p=t([1.0, 0.9, 1.0, 0.8]), min_p=t([0.0, 0.0, 0.0, 0.05]),
                         seeds=t([1, 2, 3, 4]), steps=t([5, 6, 7, 8]), need_filter=True,
                         all_greedy=False)
    scaled = logits / st.temperature[:, None]
    noise = -torch.log(-torch.log(uniform_noise(st.seeds, st.steps, V)))
    plain = gumbel_max(scaled, st.seeds, st.steps)
    filtered = filtered_draw(scaled, st.top_k, st.top_p, st.min_p, st.seeds, st.steps)
    assert torch.equal(plain, (scaled.double() + noise).argmax(-1))
    assert torch.equal(filtered, (_filter(scaled, st).double() + noise).argmax(-1))
    for row, ids in enumerate(allowed):
        assert int(plain[row]) in ids and int(filtered[row]) in ids
    assert int(plain[3]) == int(filtered[3]) == 97  # +100: certain


def fused_experts_large() -> None:
    """The fused experts with prefill tiles (sorted, padded into blocks) against the
    reference: summed (pieces held elsewhere among them) and as unsummed rows."""
    from moebius.model.moe import experts_reference
    from moebius.model.triton_moe_large import experts_fused_large

    g = torch.Generator().manual_seed(7)
    for T, P, K, H, c, held in [(40, 8, 4, 64, 32, True), (33, 6, 2, 64, 48, False)]:
        x = torch.randn(T, H, generator=g)
        w13 = torch.randn(P, 2 * c, H, generator=g) * H**-0.5
        w2 = torch.randn(P, c, H, generator=g) * c**-0.5
        pieces = torch.randint(0 if held else -1, P, (T, K), generator=g)
        wts = torch.rand(T, K, generator=g)
        ref = experts_reference(x, pieces, wts, w13, w2)
        for bm, tiles in ((16, (32, 32, 32, 32)), (64, (32, 64, 64, 32))):
            kw = dict(bm=bm, tiles=tiles, warps=4)
            assert rel(experts_fused_large(x, pieces, wts, w13, w2, **kw), ref) < 1e-5
            if held:
                rows = experts_fused_large(x, pieces, wts, w13, w2, reduce=False, **kw)
                assert rows.shape == (T, K, H) and rel(rows.sum(1), ref) < 1e-5


def gemv() -> None:
    """The one-token GEMV on a whole weight and on a column slice (a TP shard's view)."""
    from moebius.model.triton_gemv import gemv

    g = torch.Generator().manual_seed(3)
    for T, N, K in [(1, 96, 256), (3, 100, 300)]:
        x = torch.randn(T, K, generator=g)
        whole = torch.randn(N, K + 64, generator=g)
        for w in (whole[:, :K].contiguous(), whole[:, 32 : 32 + K]):
            assert rel(gemv(x, w), x.double() @ w.double().T) < 1e-5


def decode_attention() -> None:
    """Split and merged decode attention over the paged pool against the SDPA path."""
    from moebius.model.attention import AttentionMeta, paged_attention
    from moebius.model.triton_attention import paged_decode_attention

    g = torch.Generator().manual_seed(4)
    # (40 sequences at 4 KV heads: one split a sequence, several tiles each)
    for B, nh, kvh, ctx_max in [(1, 8, 2, 300), (3, 4, 4, 70), (40, 4, 4, 150)]:
        d, bs = 32, 16
        NB = max(64, B * ((ctx_max + bs - 1) // bs))
        k, v = torch.randn(NB, bs, kvh, d, generator=g), torch.randn(NB, bs, kvh, d, generator=g)
        q = torch.randn(B, nh, d, generator=g)
        lens = torch.randint(1, ctx_max + 1, (B,), generator=g)
        lens[0] = ctx_max  # every split holds context
        width = (ctx_max + bs - 1) // bs
        tables = torch.randperm(NB, generator=g)[: B * width].view(B, width)
        meta = AttentionMeta(torch.zeros(0, dtype=torch.long), torch.arange(B), tables, lens,
                             [], ctx_max)
        ref = paged_attention(q, k, v, meta, d**-0.5)  # CPU: SDPA
        # splits sized for the longest context, and (as CUDA graphs do) for a far longer one:
        # the splits past a sequence's context are neither stored nor merged
        for max_context in (ctx_max, 8 * ctx_max):
            out = paged_decode_attention(q, k, v, tables, lens, d**-0.5, max_context)
            assert rel(out, ref) < 1e-5


def prefill_attention() -> None:
    """Every prefill chunk in one launch (some after a cached prefix) against SDPA."""
    from moebius.model.attention import AttentionMeta, PrefillChunk, paged_attention
    from moebius.model.triton_prefill import PrefillPlan, paged_prefill_attention

    g = torch.Generator().manual_seed(5)
    nh, kvh, d, bs, NB = 4, 2, 32, 16, 64
    k, v = torch.randn(NB, bs, kvh, d, generator=g), torch.randn(NB, bs, kvh, d, generator=g)
    perm, chunks, T = torch.randperm(NB, generator=g).tolist(), [], 0
    for start_pos, n in [(0, 1), (0, 37), (48, 21), (17, 70), (100, 90)]:
        nb = (start_pos + n + bs - 1) // bs
        table, perm = perm[:nb], perm[nb:]
        chunks.append(PrefillChunk(T, n, start_pos, torch.tensor(table)))
        T += n
    q = torch.randn(T, nh, d, generator=g)
    meta = AttentionMeta(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                         torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                         chunks)
    ref = paged_attention(q, k, v, meta, d**-0.5)  # CPU: SDPA per chunk
    for launch in (None, (32, 16, 4, 1)):  # the default tiles; smaller ones
        out = torch.full_like(q, float("nan"))
        paged_prefill_attention(q, k, v, PrefillPlan.build(chunks, "cpu", launch), d**-0.5, out)
        assert rel(out, ref) < 1e-5


def mla_decode() -> None:
    """The MLA decode kernel (latents as one MQA head, c as the value) against the torch
    latent attention."""
    from moebius.model.attention import AttentionMeta
    from moebius.model.mla import latent_attention
    from moebius.model.triton_mla import paged_mla_decode

    g = torch.Generator().manual_seed(6)
    # 2200: 2 tiles a split; r = 256: two merge programs a head (merge_splits' 128 columns)
    for B, nh, ctx_max, r in [(1, 4, 200, 64), (3, 8, 40, 64), (1, 4, 2200, 64), (2, 4, 300, 256)]:
        dr, bs = 16, 16
        NB = max(64, B * ((ctx_max + bs - 1) // bs))
        cache = torch.randn(NB, bs, 1, r + dr, generator=g)
        q = torch.randn(B, nh, r + dr, generator=g) * 0.1
        lens = torch.randint(1, ctx_max + 1, (B,), generator=g)
        width = (ctx_max + bs - 1) // bs
        tables = torch.randperm(NB, generator=g)[: B * width].view(B, width)
        lens[0] = ctx_max
        meta = AttentionMeta(torch.zeros(0, dtype=torch.long), torch.arange(B), tables, lens,
                             [], ctx_max)
        ref = latent_attention(q, cache, meta, 0.07, r)  # CPU: torch
        for max_context in (ctx_max, 8 * ctx_max):  # as decode_attention's
            assert rel(paged_mla_decode(q, cache, tables, lens, 0.07, max_context, r), ref) < 1e-5


CHECKS = {f.__name__: f for f in (qk_norm_rope_write, norm_route_align_experts, router_fold,
                                  gemv, gated,
                                  fused_experts_large, sort_pairs, gumbel_max, filtered_draw,
                                  restricted_draw, decode_attention, prefill_attention,
                                  mla_decode)}

if __name__ == "__main__":
    torch.manual_seed(0)
    CHECKS[sys.argv[1]]()
    print(f"{sys.argv[1]}: ok")
