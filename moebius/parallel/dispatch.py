"""EP token dispatch and combine by all-to-all: each token travels only to the ranks that own
one of its top-k experts, once per rank however many of its experts live there.

The alternative in ``model/moe.py`` all-gathers every rank's (padded) tokens and
reduce-scatters the outputs: fixed shapes (CUDA-graph friendly), but every rank receives every
token. All-to-all moves fewer bytes when a token's k experts touch few of the N ranks, which
grows with N (top-8 of 128 experts: a token needs ~all of 2 ranks but ~66% of 8), at the price
of a size exchange (and a host sync) every layer. ``Comm.ep_exchange`` picks; both give the
same sums.

Shape legend: T tokens of this rank, K top-k, N ranks, H hidden, S rows sent, R received.
"""

from __future__ import annotations

import torch

from moebius.parallel.comm import Comm


def dispatch_combine(x, ids, weights, comm: Comm, num_experts: int, compute):
    """Σ_k weight·expert_k(x) for this rank's tokens x (T, H) routed to expert ``ids`` (T, K),
    where ``compute(rows, ids, weights)`` returns this rank's experts' partial sums for the
    rows it received (ids of experts held elsewhere are -1)."""
    T, K = ids.shape
    N = comm.world_size
    per = num_experts // N
    dest = ids // per  # (T, K): owner rank of each pick
    need = torch.zeros(N, T, dtype=torch.bool, device=x.device)
    need.scatter_(0, dest.t(), True)  # need[j, t]: token t has an expert on rank j
    send_rank, send_tok = need.nonzero(as_tuple=True)  # sorted by rank, then token
    send_counts = torch.bincount(send_rank, minlength=N)
    recv_counts = comm.all_to_all(send_counts, [1] * N, [1] * N)
    send, recv = send_counts.tolist(), recv_counts.tolist()  # sizes: one host sync
    picks = torch.where(dest[send_tok] == send_rank[:, None], ids[send_tok], -1)  # (S, K)
    rows = comm.all_to_all(x[send_tok], send, recv)
    r_ids = comm.all_to_all(picks, send, recv)
    r_w = comm.all_to_all(weights[send_tok], send, recv)
    partial = comm.all_to_all(compute(rows, r_ids, r_w), recv, send)  # back, in send order
    out = torch.zeros(T * N, x.shape[1], dtype=partial.dtype, device=x.device)
    out.index_copy_(0, send_tok * N + send_rank, partial)
    return out.view(T, N, -1).sum(1)  # fixed rank order: deterministic
