"""The counter-based sampler draws from the right distribution and filters correctly."""

from __future__ import annotations

import torch

from moebius.model.sampler import SamplingTensors, _filter, apply_logit_rules, sample


def _st(B, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed0=0):
    return SamplingTensors(
        temperature=torch.full((B,), temperature),
        top_k=torch.full((B,), top_k),
        top_p=torch.full((B,), top_p),
        min_p=torch.full((B,), min_p),
        seeds=torch.arange(B) + seed0,
        steps=torch.zeros(B, dtype=torch.long),
        need_filter=top_k > 0 or top_p < 1 or min_p > 0,
        all_greedy=temperature == 0,
    )


def test_draws_follow_softmax():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    B = 20000
    logits = probs.log().expand(B, -1).clone()
    counts = torch.bincount(sample(logits, _st(B)), minlength=4).float() / B
    assert torch.allclose(counts, probs, atol=0.015)


def test_top_k_top_p_min_p_filter():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, -1).clone()
    assert set(sample(logits, _st(4000, top_k=2)).tolist()) == {0, 1}
    assert set(sample(logits, _st(4000, top_p=0.7)).tolist()) == {0, 1}
    assert set(sample(logits, _st(4000, min_p=0.35)).tolist()) == {0, 1}
    assert set(sample(logits, _st(4000, top_p=0.01)).tolist()) == {0}


def test_filters_keep_ties_at_the_cut_and_top_p_one_drops_nothing():
    """A filter keeps every token tied with its last kept one, whatever order the sort gave
    the ties (docs/decisions.md; triton_sample.filtered_draw keeps the same set); top_p = 1
    drops nothing even where float32's cumulative sum reaches 1 before the last token."""
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0], [3.0, 3.0, 1.0, 0.0, -1.0]])
    kept = torch.isfinite(_filter(logits, _st(2, top_k=2)))
    assert kept.tolist() == [[True, True, True, True, False], [True, True, False, False, False]]
    kept = torch.isfinite(_filter(logits, _st(2, top_k=1)))
    assert kept.tolist() == [[True, False, False, False, False], [True, True, False, False, False]]
    wide = torch.cat([torch.tensor([[40.0]]), torch.zeros(1, 1000)], 1)  # mass 1 - 4e-15 first
    assert torch.isfinite(_filter(wide, _st(1, top_p=1.0, top_k=5000))).all()
    assert torch.isfinite(_filter(wide, _st(1, top_p=0.999))).sum() == 1


def test_same_seed_and_step_same_draw_regardless_of_row():
    logits = torch.randn(8, 100)
    st = _st(8)
    a = sample(logits, st)
    perm = torch.randperm(8)
    st2 = _st(8)
    st2.seeds = st.seeds[perm]
    assert torch.equal(sample(logits[perm], st2), a[perm])


def test_logit_rules_against_hand_computed():
    """Row 0 keeps tokens 1 and 4 and biases 4 and 0 (0 stays masked); row 1 is biased only;
    row 2 untouched."""
    logits = torch.tensor([[0.5, 1.0, -2.0, 3.0, 0.0, 1.5],
                           [0.5, 1.0, -2.0, 3.0, 0.0, 1.5],
                           [0.5, 1.0, -2.0, 3.0, 0.0, 1.5]])
    t = torch.tensor
    apply_logit_rules(logits, t([0]), t([0, 0]), t([4, 1]), t([0, 0, 1, 1]), t([4, 0, 5, 3]),
                      t([2.5, 7.0, -100.0, 0.25]))
    inf = float("-inf")
    want = torch.tensor([[inf, 1.0, inf, inf, 2.5, inf],
                         [0.5, 1.0, -2.0, 3.25, 0.0, -98.5],
                         [0.5, 1.0, -2.0, 3.0, 0.0, 1.5]])
    assert torch.equal(logits, want)
    # only the kept tokens are drawn, with or without filters; greedy takes the biased max
    rows = torch.tensor([[0.0, 2.0, 1.0, 0.5]]).expand(2000, -1).clone()
    apply_logit_rules(rows, torch.arange(2000), torch.arange(2000).repeat_interleave(2),
                      torch.tensor([0, 3]).repeat(2000), None, None, None)
    assert set(sample(rows, _st(2000)).tolist()) == {0, 3}
    assert set(sample(rows, _st(2000, top_p=0.9)).tolist()) == {0, 3}
    assert set(sample(rows, _st(2000, temperature=0)).tolist()) == {3}
