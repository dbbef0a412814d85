"""The last program to finish does the follow-up work: arrival counters for Triton kernels.

A decode kernel whose programs each produce a part of a result (attention's context splits,
the router's expert blocks) used to need a second launch to combine the parts (the split
merge, top-k and the experts' alignment). At batch 1 each such launch costs a few µs of a
~60 µs layer whatever it does. Instead, every program counts itself in on a counter once its
stores are done; the one that arrives last sees all the others' stores (release/acquire on
the counter) and combines them in the same launch, then sets the counter back to zero for
the next launch (or graph replay). The combining order does not depend on which program is
last, so results stay deterministic.

Counters live in buffers that are never freed: a CUDA graph keeps their address.

Off by default (``MOEBIUS_ARRIVE=1`` turns it on): written in session 6, checked on CPU under
Triton's interpreter and compiled for sm_90, but no GPU was lent to run it; the kernels keep
their separate merge / top-k launches until the GPU tests and a timing have passed.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

ENABLED = os.environ.get("MOEBIUS_ARRIVE", "0") == "1"
_BUFFERS: dict[tuple[str, int | None], list[torch.Tensor]] = {}


def arrival_counters(device: torch.device, site: str, n: int) -> torch.Tensor:
    """At least ``n`` zeroed int32 counters for the kernel ``site`` on ``device``; each launch
    leaves them zero again. Grown (never outside start-up in practice) only when not
    capturing a graph; older buffers stay alive for the graphs that captured them."""
    bufs = _BUFFERS.setdefault((site, device.index), [])
    if not bufs or bufs[-1].numel() < n:
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        assert not capturing, f"{site}: arrival counters must grow before graph capture"
        bufs.append(torch.zeros(max(n, 1 << 14), dtype=torch.int32, device=device))
    return bufs[-1]


@triton.jit
def last_to_arrive(counter, total):
    """True in the one program of the ``total`` that share ``counter`` that arrives last,
    after every program's stores before its call are visible to it; it resets the counter.
    Data the others stored must then be loaded past L1 (``cache_modifier=".cg"``)."""
    tl.debug_barrier()  # every thread's stores come before the release below
    seen = tl.atomic_add(counter, 1, sem="acq_rel")
    last = seen == total - 1
    tl.store(counter, 0, mask=last)
    return last
