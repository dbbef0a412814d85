"""Small all-reduces through torch's symmetric memory: one kernel, no NCCL.

TP's row-parallel layers all-reduce twice a layer; at decode batch sizes the message is a few
KB to a few MB (batch × hidden × 2 bytes), where NCCL's ring pays its protocol latency
(~15-25 µs a call inside a CUDA graph on 2×H200) for microseconds of data. Here every rank owns
one buffer in symmetric memory (each rank maps every peer's buffer, NVLink peer access), and
``torch.ops.symm_mem.one_shot_all_reduce_copy_out`` does it in one launch: copy the local input
into this rank's buffer, a device-side barrier over the signal pads, read and sum every rank's
buffer, a closing barrier (so a peer never overwrites a buffer still being read). No
multicast (NVLink SHARP) is needed, and the launch is graph-capturable.

Used by ``Comm.all_reduce`` for bf16/fp32 messages up to ``max_bytes`` (larger ones, and any
set-up that fails, stay on NCCL). ``MOEBIUS_SYMM_ALLREDUCE=0`` turns it off;
``MOEBIUS_SYMM_ALLREDUCE_MAX`` sets the byte limit (default from ``bench/allreduce.py`` runs,
BENCHMARKS.md).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger("moebius")

DEFAULT_MAX_BYTES = 1 << 20  # 1 MiB: decode up to 256 tokens at hidden 2048 (bf16)


class SymmAllReduce:
    """One-shot all-reduce over a symmetric buffer of ``max_bytes`` per rank."""

    def __init__(self, group, device: torch.device, max_bytes: int) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.group_name
        self.max_bytes = max_bytes
        if hasattr(symm_mem, "is_symm_mem_enabled_for_group") and not (
            symm_mem.is_symm_mem_enabled_for_group(self.group_name)
        ):
            symm_mem.enable_symm_mem_for_group(self.group_name)
        # one byte buffer, viewed as the message's dtype (fp32 needs 4-byte alignment: the
        # allocation is page aligned)
        self.buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
        self.handle = symm_mem.rendezvous(self.buffer, self.group_name)
        self._op = torch.ops.symm_mem.one_shot_all_reduce_copy_out

    def eligible(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        return (
            x.dtype in (torch.bfloat16, torch.float32)
            and x.is_contiguous()
            and 0 < nbytes <= self.max_bytes
            and nbytes % 16 == 0  # the kernel moves 16-byte vectors
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over ranks, in place."""
        buf = self.buffer[: x.numel() * x.element_size()].view(x.dtype)
        self._op(buf, x.view(-1), "sum", self.group_name, out=x.view(-1))
        return x


def make_symm_allreduce(group, backend: str, world_size: int) -> SymmAllReduce | None:
    """A ``SymmAllReduce`` for ``group`` when it is NCCL on one host with peer access, else
    None (CPU/gloo, turned off, or a failed set-up: logged, NCCL serves every all-reduce)."""
    if world_size < 2 or backend != "nccl" or os.environ.get("MOEBIUS_SYMM_ALLREDUCE") == "0":
        return None
    max_bytes = int(os.environ.get("MOEBIUS_SYMM_ALLREDUCE_MAX", DEFAULT_MAX_BYTES))
    if max_bytes <= 0:
        return None
    device = torch.device("cuda", torch.cuda.current_device())
    ar, why = None, ""
    try:
        ar = SymmAllReduce(group, device, max_bytes)
        x = torch.full((1024,), float(dist.get_rank(group) + 1), device=device)
        ar(x)  # checked once before it is trusted
        want = world_size * (world_size + 1) / 2
        if not bool((x == want).all()):
            ar, why = None, f"a check gave {x[0].item()}, expected {want}"
    except Exception as e:  # older torch, no peer access, no symmetric memory backend
        ar, why = None, str(e)
    # every rank must take the same path, or their collectives would not match
    ok = torch.tensor([ar is not None], dtype=torch.int32, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    if not ok.item():
        log.warning("symmetric-memory all-reduce off (%s): NCCL serves all-reduces",
                    why or "a peer could not set it up")
        return None
    return ar
