"""CUDA graphs of the decode step: captured once at start-up for a ladder of batch sizes, for
each layout a rank can run, over the fixed-address weights and KV pool, then replayed.

A batch of n decode sequences replays the smallest bucket >= n; the padded rows compute on
the pool's pad block and their logits are dropped. Larger batches and prefill run eagerly.
Ranks > 1 hold graphs of both layouts over the same buffers (a switch recaptures nothing); the
collectives are captured with them, so every rank replays the same bucket in the same step.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from moebius.engine.messages import SeqWork
from moebius.model.attention import AttentionMeta
from moebius.parallel.layout import Layout

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
MAX_GRAPH_BATCH = 2048


def padded_table(rows: list[list[int]], width: int, pad: int, pinned: bool) -> torch.Tensor:
    """Block tables (len(rows), width) int64, each row padded with ``pad``, in pinned memory
    when asked (the caller's copy is non-blocking). Built through numpy: 2,048 rows of up to
    63 blocks took 7.4 ms by ``torch.tensor`` on padded lists and take 1.9 ms here, of up to
    255 blocks 29.9 and 6.6 ms (the 2-core CPU machine), every decode step on every rank."""
    table = np.full((len(rows), width), pad, dtype=np.int64)
    for row, blocks in zip(table, rows, strict=True):
        row[: len(blocks)] = blocks
    out = torch.from_numpy(table)
    return out.pin_memory() if pinned else out


class DecodeGraphs:
    def __init__(self, runner, max_batch: int) -> None:
        self.runner = runner
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.buckets = sorted(set(self.buckets))
        bs = runner.cfg.block_size
        self.max_blocks = (runner.cfg.context_len + bs - 1) // bs
        B, dev = self.buckets[-1], runner.device
        self.ids = torch.zeros(B, dtype=torch.long, device=dev)
        self.pos = torch.zeros(B, dtype=torch.long, device=dev)
        self.slots = torch.zeros(B, dtype=torch.long, device=dev)
        self.tables = torch.zeros(B, self.max_blocks, dtype=torch.long, device=dev)
        self.ctx = torch.ones(B, dtype=torch.long, device=dev)
        self.rows = torch.arange(B, device=dev)
        self.graphs: dict[tuple[str, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.capture_seconds = 0.0

    def _meta(self, B: int) -> AttentionMeta:
        return AttentionMeta(
            slot_mapping=self.slots[:B],
            decode_token_idx=self.rows[:B],
            decode_block_tables=self.tables[:B],
            decode_ctx_lens=self.ctx[:B],
            prefills=[],
            decode_max_context=self.max_blocks * self.runner.cfg.block_size,
        )

    def _forward(self, layout: Layout, B: int) -> torch.Tensor:
        r = self.runner
        hidden = r.forward(  # the architecture's forward (decoder or DeepSeek's)
            r.weights,
            r.model,
            layout,
            r.comm,
            r.rotary,
            r.kv,
            self.ids[:B],
            self.pos[:B],
            self._meta(B),
            B,
        )
        return (hidden @ r.weights.lm_head.t()).float()

    @torch.inference_mode()
    def capture(self, layout: Layout) -> None:
        from moebius.model import triton_pdl  # Triton: there on CUDA machines

        t0 = time.perf_counter()
        self._pad(layout, 0, self.buckets[-1])
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for B in reversed(self.buckets):  # largest first: smaller ones reuse its memory
                for _ in range(2):
                    self._forward(layout, B)
                triton_pdl.prefer_shared_memory()  # before capture: nodes keep attributes
                g = torch.cuda.CUDAGraph()
                # thread_local: NCCL's watchdog thread may query events while a rank captures
                with torch.cuda.graph(g, pool=self.pool, stream=stream,
                                      capture_error_mode="thread_local"):
                    logits = self._forward(layout, B)
                self.graphs[(layout.mode, B)] = (g, logits)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.capture_seconds += time.perf_counter() - t0

    def _pad(self, layout: Layout, start: int, stop: int) -> None:
        pad = self.runner.kv.pad_block(layout)
        bs = self.runner.cfg.block_size
        self.ids[start:stop] = 0
        self.pos[start:stop] = 0
        self.slots[start:stop] = pad * bs
        self.tables[start:stop] = pad
        self.ctx[start:stop] = 1

    def bucket(self, layout: Layout, n: int) -> int:
        """The smallest captured batch >= n for ``layout``, or 0 when none was captured."""
        if not 0 < n <= self.buckets[-1] or (layout.mode, self.buckets[-1]) not in self.graphs:
            return 0
        return next(b for b in self.buckets if b >= n)

    @torch.inference_mode()
    def stage(self, layout: Layout, seqs: list[SeqWork], B: int) -> torch.Tensor:
        """Copy n <= B decode sequences' inputs into bucket B's static buffers (ranks > 1: the
        bucket of the largest rank's batch; n may be 0) and return the token-id buffer, whose
        ``INFLIGHT`` rows the caller fills on the device. Inputs travel through pinned memory:
        nothing here waits for the step before."""
        n = len(seqs)
        bs = self.runner.cfg.block_size
        pad = self.runner.kv.pad_block(layout)
        ids, pos, slots, ctx = [], [], [], []
        for s in seqs:
            p = s.start_pos
            ids.append(s.token_ids[0])
            pos.append(p)
            slots.append(s.block_ids[p // bs] * bs + p % bs)
            ctx.append(p + 1)
        # Only the batch's widest table is copied: columns past a sequence's context are
        # never read, so the static table's older entries there do no harm.
        if n:
            width = max(len(s.block_ids) for s in seqs)
            pinned = self.runner.device.type == "cuda"
            tables = padded_table([s.block_ids for s in seqs], width, pad, pinned)
            host = torch.tensor([ids, pos, slots, ctx], dtype=torch.long, pin_memory=pinned)
            self.ids[:n].copy_(host[0], non_blocking=True)
            self.pos[:n].copy_(host[1], non_blocking=True)
            self.slots[:n].copy_(host[2], non_blocking=True)
            self.ctx[:n].copy_(host[3], non_blocking=True)
            self.tables[:n, :width].copy_(tables, non_blocking=True)
        if n < B:
            self._pad(layout, n, B)
        return self.ids

    def replay(self, layout: Layout, B: int, n: int) -> torch.Tensor:
        """Replay bucket B over the staged inputs: logits (n, V) float32 of its n sequences."""
        graph, logits = self.graphs[(layout.mode, B)]
        graph.replay()
        return logits[:n]
