"""The KV pool of one rank: one byte buffer allocated once, read through a TP view (this
rank's KV-head slice of every request) or an EP view (all KV heads of its own requests).

Shape legend: L layers, P planes (2: K and V; 1: MLA's latent), NB blocks (per view), bs block
size, kvh KV heads in the view, d head dim. The buffer is (L, P, NB_ep·bs·kv·d); the TP view has
NB_ep·kv/kvh_local blocks.

MLA (DeepSeek): the latent (kv_lora_rank + qk_rope_head_dim values per token) is one KV head in
one plane. TP replicates it on every rank (every request's latent on every rank: the same
blocks per rank as EP, so 1/N of EP's tokens cluster-wide); EP keeps each rank's own requests.
"""

from __future__ import annotations

import torch

from moebius.config import ModelConfig
from moebius.parallel.layout import Layout


class KVPool:
    def __init__(
        self, cfg: ModelConfig, world_size: int, num_blocks_ep: int, block_size: int, dtype, device
    ) -> None:
        self.cfg = cfg
        self.block_size = block_size
        self.num_blocks_ep = num_blocks_ep
        self.world_size = world_size
        # one extra EP block at the end: the pad block that padded rows of a CUDA-graph batch
        # write into; the scheduler never hands it out
        per_layer = (num_blocks_ep + 1) * block_size * cfg.num_kv_heads * cfg.head_dim
        self.num_planes = cfg.kv_planes
        self.buf = torch.zeros(
            cfg.num_layers, self.num_planes, per_layer, dtype=dtype, device=device
        )

    def _ratio(self, layout: Layout) -> int:
        return self.cfg.num_kv_heads // layout.num_local_kv_heads(self.cfg)

    def num_blocks(self, layout: Layout) -> int:
        """Blocks the scheduler may use in ``layout``'s view (the pad block excluded)."""
        return self.num_blocks_ep * self._ratio(layout)

    def pad_block(self, layout: Layout) -> int:
        return self.num_blocks(layout)

    def view(self, layer: int, layout: Layout) -> tuple[torch.Tensor, ...]:
        """(k, v) caches (NB, bs, kvh, d) of one layer; (latent,) for MLA."""
        kvh = layout.num_local_kv_heads(self.cfg)
        blocks = (self.num_blocks_ep + 1) * self._ratio(layout)
        shape = (blocks, self.block_size, kvh, self.cfg.head_dim)
        return tuple(self.buf[layer, p].view(shape) for p in range(self.num_planes))

    def nbytes(self) -> int:
        return self.buf.numel() * self.buf.element_size()

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype_size: int) -> int:
        """Bytes of one EP-view block over all layers."""
        per_token = cfg.kv_planes * cfg.num_kv_heads * cfg.head_dim
        return cfg.num_layers * block_size * per_token * dtype_size
