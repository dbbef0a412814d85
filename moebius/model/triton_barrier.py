"""A barrier across all programs of one Triton launch (a persistent grid), and its counters.

A kernel whose programs must all finish one phase before any starts the next used to be two
launches; the second waits for the first to drain and then ramps up from nothing (at batch 1
a few µs each, most of a small phase). Inside one launch every program instead counts itself
in and spins until the last arrives, and may issue the next phase's weight loads (no program
writes those) before it waits, so HBM stays busy across the phase change.

The barrier is sense-reversing: two int32 per site (arrivals, generation). A program reads the
generation, arrives (acq_rel), and spins on the generation (acquire); the last to arrive sets
the arrivals back to zero and bumps the generation (release). So it needs no reset between
launches or CUDA graph replays, and data other programs stored before the barrier is visible
after it (load it past L1: ``cache_modifier=".cg"``).

Every program of the grid must be resident at once, or the resident ones spin forever: launch
at most ``resident_programs`` programs. Under programmatic dependent launch this holds: the
kernel after this one launches only once all of this one's programs have started (each calls
``gdc_launch_dependents`` at its start), so it cannot take their place. Triton's interpreter
runs programs one after another, so it never passes a barrier: kernels keep a two-launch mode
for it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_COUNTERS: dict[tuple[str, int | None], torch.Tensor] = {}


def barrier_counters(device: torch.device, site: str) -> torch.Tensor:
    """The two zeroed int32 counters of barrier ``site`` on ``device``, allocated once (outside
    graph capture) and never freed, as graphs keep their address."""
    key = (site, device.index)
    if key not in _COUNTERS:
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        assert not capturing, f"{site}: barrier counters must exist before graph capture"
        _COUNTERS[key] = torch.zeros(2, dtype=torch.int32, device=device)
    return _COUNTERS[key]


def resident_programs(kernel, num_warps: int, device: torch.device) -> int:
    """How many programs of the compiled ``kernel`` fit on ``device`` at once."""
    _ = kernel.run  # the property loads the binary, which sets n_regs
    return programs_that_fit(kernel.n_regs, kernel.metadata.shared, num_warps,
                             torch.cuda.get_device_properties(device))


def programs_that_fit(regs: int, shared: int, num_warps: int, props) -> int:
    """Programs of ``num_warps`` warps, ``regs`` registers a thread and ``shared`` bytes of
    shared memory that ``props``' GPU holds at once: every SM's registers (allocated per warp
    in units of 256), threads and shared memory; at most 32 a SM."""
    warp_regs = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // (warp_regs * num_warps)
    by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * num_warps)
    by_smem = getattr(props, "shared_memory_per_multiprocessor", 228 << 10) // max(shared, 1)
    return props.multi_processor_count * min(by_regs, by_threads, by_smem, 32)


@triton.jit
def grid_barrier(Bar, NPROG: tl.constexpr):
    """Wait until all NPROG programs of the launch have called this; their stores before it
    are visible after it."""
    tl.debug_barrier()  # every thread's stores come before the release below
    gen = tl.atomic_add(Bar + 1, 0, sem="relaxed")  # read before arriving
    seen = tl.atomic_add(Bar, 1, sem="acq_rel")
    if seen == NPROG - 1:
        tl.atomic_xchg(Bar, 0, sem="relaxed")
        tl.atomic_add(Bar + 1, 1, sem="release")
    else:
        cur = gen
        while cur == gen:
            cur = tl.atomic_add(Bar + 1, 0, sem="acquire")
    tl.debug_barrier()
