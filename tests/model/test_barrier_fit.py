"""How many programs of a persistent kernel fit at once (model/triton_barrier.py): the grid
a kernel with a grid barrier may launch without deadlocking."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("triton")

from moebius.model.triton_barrier import programs_that_fit  # noqa: E402

H100 = SimpleNamespace(multi_processor_count=132, regs_per_multiprocessor=65536,
                       max_threads_per_multi_processor=2048,
                       shared_memory_per_multiprocessor=228 << 10)


@pytest.mark.parametrize("regs,shared,warps,per_sm", [
    (100, 2048, 8, 2),  # the one-token experts kernel: two an SM
    (128, 2048, 8, 2),  # exactly two
    (129, 2048, 8, 1),  # one register more: 136 (whole 256-register units a warp), one
    (255, 1024, 4, 2),
    (32, 1024, 1, 32),  # small programs: the 32-a-SM limit
    (40, 120 << 10, 4, 1),  # shared memory bound
    (16, 0, 16, 4),  # threads bound: 4 x 512
])
def test_programs_that_fit(regs, shared, warps, per_sm):
    assert programs_that_fit(regs, shared, warps, H100) == 132 * per_sm
