"""The residual add + norm's reference (CPU) forms: what the fused CUDA launch must equal."""

from __future__ import annotations

import torch

from moebius.model.ops import ExpertRows, add_rms_norm, rms_norm


def test_add_rms_norm_sums_parts_in_each_form():
    g = torch.Generator().manual_seed(0)
    T, K, H = 5, 3, 32
    x, w = torch.randn(T, H, generator=g), torch.rand(H, generator=g) + 0.5
    rows = torch.randn(T * K, H, generator=g)
    perm = torch.randperm(T * K, generator=g)
    weights = torch.rand(T, K, generator=g)
    index = perm.view(T, K)
    # token t's part r is weights[t, r] * rows[index[t, r]]
    parts = rows[index] * weights[..., None]  # (T, K, H) in token order
    want = x + sum(parts[:, r] for r in range(K))
    for form in (parts, ExpertRows(rows, index, weights)):
        xo, h = add_rms_norm(x, form, w, 1e-6)
        assert torch.allclose(xo, want, atol=1e-6)
        assert torch.allclose(h, rms_norm(want, w, 1e-6), atol=1e-6)
    xo, h = add_rms_norm(x, parts[:, 0], w, 1e-6)  # (T, H): one part
    assert torch.equal(xo, x + parts[:, 0])
    xo, h = add_rms_norm(x, None, w, 1e-6)  # nothing pending: the norm alone
    assert xo is x and torch.equal(h, rms_norm(x, w, 1e-6))
