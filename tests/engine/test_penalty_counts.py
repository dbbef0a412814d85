"""The sampling rank's per-request token counts (engine/penalty_counts.py): outputs sent once,
in pieces over consecutive steps, count as the whole history would; rows of requests that
left a step are reused; a piece sent from a count the rank does not hold is refused."""

from __future__ import annotations

import random

import pytest
import torch

from moebius.engine.penalty_counts import PenaltyCounts

V = 50


def _h2d(data, dtype=torch.long):
    return torch.tensor(data, dtype=dtype)


def _bincount(ids):
    return torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=V + 1).float()


def test_pieces_count_as_the_whole_history():
    rng = random.Random(0)
    pc = PenaltyCounts(V, torch.device("cpu"))
    history = {f"r{i}": [] for i in range(12)}
    prompts = {rid: [rng.randrange(V) for _ in range(rng.randrange(1, 9))] for rid in history}
    held: dict[str, int] = {}
    for _ in range(40):
        # a changing subset samples this step; one that skipped a step is sent whole
        rids = [rid for rid in history if rng.random() < 0.7]
        parts = []
        for rid in rids:
            history[rid] += [rng.randrange(V) for _ in range(rng.randrange(0, 3))]
            counted = held.get(rid, 0)
            parts.append((history[rid][counted:], prompts[rid] if not counted else [], counted))
        slots = pc.update(rids, parts, _h2d)
        assert len(set(slots.tolist())) == len(rids)
        for rid, slot in zip(rids, slots.tolist(), strict=True):
            assert torch.equal(pc.counts[slot], _bincount(history[rid]))
            want = torch.zeros(V + 1, dtype=torch.bool)
            want[prompts[rid]] = True
            assert torch.equal(pc.in_prompt[slot], want)
        held = {rid: len(history[rid]) for rid in rids}
    assert len(pc.counts) <= 24  # rows are reused: 12 requests at most, doubling growth


def test_a_piece_from_an_unheld_count_is_refused():
    pc = PenaltyCounts(V, torch.device("cpu"))
    pc.update(["a"], [([1, 2], [], 0)], _h2d)
    with pytest.raises(RuntimeError, match="counted 2"):
        pc.update(["a"], [([3], [], 3)], _h2d)
    pc.update(["b"], [([4], [], 0)], _h2d)  # "a" skipped this step: its count is gone
    with pytest.raises(RuntimeError, match="counted None"):
        pc.update(["a"], [([3], [], 2)], _h2d)


def test_growth_keeps_the_counted_rows():
    pc = PenaltyCounts(V, torch.device("cpu"))
    pc.update(["a"], [([7, 7, 9], [3], 0)], _h2d)
    rids = ["a"] + [f"n{i}" for i in range(20)]
    parts = [([7], [], 3)] + [([i % V], [], 0) for i in range(20)]
    slots = pc.update(rids, parts, _h2d)
    assert len(pc.counts) >= 21
    assert pc.counts[slots[0], 7] == 3 and pc.counts[slots[0], 9] == 1
    assert pc.in_prompt[slots[0], 3]
