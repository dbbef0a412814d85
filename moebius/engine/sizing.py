"""How many KV blocks each rank's pool gets: from an explicit count, a byte budget, or (on
GPU) the memory left after weights and a workspace reserve; the minimum over ranks, so every
rank's pool has the same shape.
"""

from __future__ import annotations

import torch

from moebius.config import EngineConfig
from moebius.kv.pool import KVPool

CPU_DEFAULT_KV_BYTES = 64 << 20
# activations, graphs, sampler (with the penalties' counts: 4·V bytes a penalised request,
# 155 MB for 256 at a 152k vocabulary), exchange buffers
GPU_WORKSPACE_BYTES = 4 << 30


def kv_blocks_for_rank(cfg: EngineConfig, runner) -> int:
    per_block = KVPool.bytes_per_block(cfg.model, cfg.block_size, runner.dtype.itemsize)
    if cfg.num_kv_blocks:
        blocks = cfg.num_kv_blocks
    elif cfg.kv_cache_memory:
        blocks = int(cfg.kv_cache_memory // per_block)
    elif cfg.device == "cuda":
        free, total = torch.cuda.mem_get_info()
        budget = free - (1 - cfg.gpu_memory_utilization) * total - GPU_WORKSPACE_BYTES
        blocks = int(max(budget, 0) // per_block)
    else:
        blocks = CPU_DEFAULT_KV_BYTES // per_block
    # The TP view must hold whole blocks too: NB_ep · kv / kv_local.
    blocks = max(blocks, 1)
    if runner.comm.world_size > 1:
        t = torch.tensor([blocks], dtype=torch.long, device=runner.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=runner.comm.group)
        blocks = int(t.item())
    return blocks
