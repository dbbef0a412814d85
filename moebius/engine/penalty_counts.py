"""Each penalised request's token counts, kept on the sampling rank's device across steps.

Presence, frequency and repetition penalties need, at every step, how often each token occurs
in a request's outputs (and, for repetition, which tokens its prompt holds). Sending every
output at every step made a step's message and its host work grow with each token: O(length)
a step, O(length²) a request. The scheduler sends each output once instead
(``SeqWork.penalties``: the outputs after the first ``counted``, the prompt only with
``counted`` 0); they are counted here into a request's row of a pooled (rows, V + 1) float32
tensor (and a bool prompt row), which the rank keeps while the request samples here in
consecutive steps, as it keeps block tables (``ModelRunner._full_tables``). A request that
skipped a step, or whose table was sent whole (a switch may move its sampling rank), is sent
whole and starts over. Column V absorbs padding. A row costs 4·V bytes (0.6 MB at Qwen3's
151,936 tokens) plus V for the prompt's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class PenaltyCounts:
    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.V, self.device = vocab_size, device
        self.counts = torch.zeros(0, vocab_size + 1, dtype=torch.float32, device=device)
        self.in_prompt = torch.zeros(0, vocab_size + 1, dtype=torch.bool, device=device)
        self.slots: dict[str, int] = {}  # request id -> row, this step's penalised requests
        self.counted: dict[str, int] = {}  # request id -> outputs counted in its row

    def update(self, rids: list[str], parts: list[tuple[list[int], list[int], int]],
               h2d: Callable[[list], torch.Tensor]) -> torch.Tensor:
        """Count this step's ``parts`` (outputs, prompt, counted) of requests ``rids`` and
        return their rows (n,) on the device; the rows of requests not in this step are
        freed. Raises if a request sends outputs from a count this rank does not hold."""
        old_slots, old_counted = self.slots, self.counted
        self.slots, self.counted = {}, {}
        fresh, free = [], sorted(set(range(len(self.counts))) - set(old_slots.values()),
                                 reverse=True)
        for rid, (outputs, _, counted) in zip(rids, parts, strict=True):
            if counted:
                if old_counted.get(rid) != counted:
                    raise RuntimeError(f"{rid} sent outputs from {counted} as counted; this "
                                       f"rank counted {old_counted.get(rid)}")
                self.slots[rid] = old_slots.pop(rid)
            else:
                fresh.append(rid)
            self.counted[rid] = counted + len(outputs)
        free += sorted(old_slots.values(), reverse=True)  # rows of requests gone this step
        if len(fresh) > len(free):
            self._grow(len(self.counts) + len(fresh) - len(free))
            free = sorted(set(range(len(self.counts))) - set(self.slots.values()), reverse=True)
        for rid in fresh:
            self.slots[rid] = free.pop()
        rows = [self.slots[rid] for rid in rids]
        if fresh:
            reset = h2d([self.slots[rid] for rid in fresh])
            self.counts[reset] = 0.0
            self.in_prompt[reset] = False
        out_rows, out_ids, prompt_rows, prompt_ids = [], [], [], []
        for row, (outputs, prompt, _) in zip(rows, parts, strict=True):
            out_rows.extend([row] * len(outputs))
            out_ids.extend(outputs)
            prompt_rows.extend([row] * len(prompt))
            prompt_ids.extend(prompt)
        if out_ids:
            self.counts.index_put_((h2d(out_rows), h2d(out_ids)),
                                   torch.ones(len(out_ids), device=self.device), accumulate=True)
        if prompt_ids:
            self.in_prompt[h2d(prompt_rows), h2d(prompt_ids)] = True
        return h2d(rows)

    def forget(self) -> None:
        """A step without penalised rows: every row is free again (each request sent whole)."""
        self.slots, self.counted = {}, {}

    def _grow(self, rows: int) -> None:
        """At least ``rows`` rows (doubling), the counted ones kept in place."""
        size = max(rows, 2 * len(self.counts), 8)
        counts = torch.zeros(size, self.V + 1, dtype=torch.float32, device=self.device)
        in_prompt = torch.zeros(size, self.V + 1, dtype=torch.bool, device=self.device)
        counts[: len(self.counts)] = self.counts
        in_prompt[: len(self.in_prompt)] = self.in_prompt
        self.counts, self.in_prompt = counts, in_prompt
