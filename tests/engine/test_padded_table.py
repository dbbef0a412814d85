"""The decode block tables built for each step (graph staging and the eager path)."""

from __future__ import annotations

import random

import torch

from moebius.engine.cuda_graphs import padded_table


def test_padded_table_matches_lists():
    rng = random.Random(3)
    rows = [[rng.randrange(1 << 40) for _ in range(rng.randrange(0, 20))] for _ in range(50)]
    width = max(len(r) for r in rows) + 2
    got = padded_table(rows, width, 7, pinned=False)
    want = torch.tensor([r + [7] * (width - len(r)) for r in rows], dtype=torch.long)
    assert got.dtype == torch.long and torch.equal(got, want)
    assert padded_table([], 0, 7, pinned=False).shape == (0, 0)
