"""Loads a Hugging Face checkpoint folder (single or sharded safetensors, per-expert or fused
expert tensors; Qwen3-MoE, Mixtral or DeepSeek-V2/V3 names) into one rank's ``ModelWeights``;
or fills them with random values from a config alone, for benchmarks of models whose weights
are not here.
"""

from __future__ import annotations

import json
import os
import zlib

import torch
from safetensors import safe_open

from moebius.config import ConfigError, ModelConfig
from moebius.model import router_fold
from moebius.model.weights import ExpertStore, LayerWeights, ModelWeights
from moebius.parallel.layout import Layout


class CheckpointReader:
    """Name -> tensor over all safetensors files of a folder, opened lazily."""

    def __init__(self, model_dir: str) -> None:
        index = os.path.join(model_dir, "model.safetensors.index.json")
        single = os.path.join(model_dir, "model.safetensors")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConfigError(f"{index} is corrupt: {e}") from e
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            files = ["model.safetensors"]
        else:
            raise ConfigError(f"{model_dir!r} has no model.safetensors or index")
        self.name_to_file: dict[str, str] = {}
        self.handles = {}
        for fname in files:
            path = os.path.join(model_dir, fname)
            if not os.path.isfile(path):
                raise ConfigError(f"checkpoint shard {path} is missing")
            try:
                handle = safe_open(path, framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise ConfigError(f"checkpoint file {path} is corrupt: {e}") from e
            self.handles[fname] = handle
            for name in handle.keys():
                self.name_to_file[name] = fname

    def has(self, name: str) -> bool:
        return name in self.name_to_file

    def get(self, name: str) -> torch.Tensor:
        if name not in self.name_to_file:
            raise ConfigError(f"checkpoint lacks the tensor {name!r}")
        return self.handles[self.name_to_file[name]].get_tensor(name)


def _moe_prefix(reader: CheckpointReader, layer: int) -> str:
    for p in (f"model.layers.{layer}.mlp.", f"model.layers.{layer}.block_sparse_moe."):
        if reader.has(p + "gate.weight"):
            return p
    raise ConfigError(f"checkpoint has no router weight for layer {layer}")


def _read_expert(reader: CheckpointReader, prefix: str, e: int, cfg: ModelConfig):
    """(gate_up (2I, H), down (H, I)) of expert e, from per-expert or fused tensors."""
    fused = prefix + "experts.gate_up_proj"
    if reader.has(fused):
        return reader.get(fused)[e], reader.get(prefix + "experts.down_proj")[e]
    names = [("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")]
    for g, u, d in names:
        base = f"{prefix}experts.{e}."
        if reader.has(base + g + ".weight"):
            gate, up = reader.get(base + g + ".weight"), reader.get(base + u + ".weight")
            return torch.cat([gate, up]), reader.get(base + d + ".weight")
    raise ConfigError(f"checkpoint lacks expert {e} under {prefix}experts")


class _Random:
    """A stand-in reader that makes random tensors of the right shape (benchmarks)."""

    def __init__(self, seed: int, device) -> None:
        self.seed = seed
        self.g = torch.Generator(device=device)
        self.device = device

    def rnd(self, name: str, *shape, scale: float) -> torch.Tensor:
        # Seeded by name, so every rank draws the same tensor whatever it loads.
        self.g.manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        t = torch.randn(*shape, generator=self.g, device=self.device, dtype=torch.float32)
        return t.mul_(scale)


def load_weights(
    cfg: ModelConfig,
    model_dir: str | None,
    layout: Layout,
    dtype: torch.dtype,
    device: str | torch.device,
    seed: int = 0,
) -> ModelWeights:
    """Weights for one rank: dense whole, experts in ``layout``'s pieces."""
    store = ExpertStore(cfg, layout.world_size, dtype, device)
    reader = CheckpointReader(model_dir) if model_dir else None
    rand = None if reader else _Random(seed, device)
    H, d = cfg.hidden_size, cfg.head_dim

    def get(name: str, shape: tuple, scale: float = 0.02, ones: bool = False) -> torch.Tensor:
        if reader is not None:
            t = reader.get(name)
            if tuple(t.shape) != shape:
                raise ConfigError(f"tensor {name} has shape {tuple(t.shape)}, expected {shape}")
        elif ones:
            t = torch.ones(shape, device=device)
        else:
            t = rand.rnd(name, *shape, scale=scale)
        return t.to(device=device, dtype=dtype)

    embed = get("model.embed_tokens.weight", (cfg.vocab_size, H), scale=1.0)
    norm = get("model.norm.weight", (H,), ones=True)
    if cfg.tie_word_embeddings or (reader is not None and not reader.has("lm_head.weight")):
        lm_head = embed
    else:
        lm_head = get("lm_head.weight", (cfg.vocab_size, H), scale=H**-0.5)
    layers = []
    moe_index = 0
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        lw = LayerWeights(
            input_norm=get(p + "input_layernorm.weight", (H,), ones=True),
            post_norm=get(p + "post_attention_layernorm.weight", (H,), ones=True),
        )
        if cfg.is_mla:
            _load_mla(lw, get, p, cfg)
        else:
            # one buffer [q; k; v]: a rank holding every head projects with one GEMM, TP
            # ranks read their head slices of the three views
            lw.qkv_proj = torch.cat([
                get(p + "self_attn.q_proj.weight", (cfg.q_size, H), scale=H**-0.5),
                get(p + "self_attn.k_proj.weight", (cfg.kv_size, H), scale=H**-0.5),
                get(p + "self_attn.v_proj.weight", (cfg.kv_size, H), scale=H**-0.5),
            ])
            lw.q_proj, lw.k_proj, lw.v_proj = lw.qkv_proj.split(
                [cfg.q_size, cfg.kv_size, cfg.kv_size]
            )
            o_shape = (H, cfg.q_size)
            lw.o_proj = get(p + "self_attn.o_proj.weight", o_shape, scale=cfg.q_size**-0.5)
        if cfg.qk_norm:
            lw.q_norm = get(p + "self_attn.q_norm.weight", (d,), ones=True)
            lw.k_norm = get(p + "self_attn.k_norm.weight", (d,), ones=True)
        if i in cfg.dense_layers:
            inter = cfg.dense_intermediate_size
            lw.dense = {
                "gate": get(p + "mlp.gate_proj.weight", (inter, H), scale=H**-0.5),
                "up": get(p + "mlp.up_proj.weight", (inter, H), scale=H**-0.5),
                "down": get(p + "mlp.down_proj.weight", (H, inter), scale=inter**-0.5),
            }
        else:
            prefix = _moe_prefix(reader, i) if reader else p + "mlp."
            lw.router = get(prefix + "gate.weight", (cfg.num_experts, H), scale=H**-0.5)
            lw.moe_index = moe_index
            if cfg.num_shared_experts:
                inter = cfg.num_shared_experts * cfg.moe_intermediate_size
                sp = prefix + "shared_experts."
                lw.shared = {
                    "gate": get(sp + "gate_proj.weight", (inter, H), scale=H**-0.5),
                    "up": get(sp + "up_proj.weight", (inter, H), scale=H**-0.5),
                    "down": get(sp + "down_proj.weight", (H, inter), scale=inter**-0.5),
                }
            if cfg.scoring_func == "sigmoid":  # kept in float32, as transformers does
                bias = get(prefix + "gate.e_score_correction_bias", (cfg.num_experts,), scale=0.01)
                lw.router_bias = bias.float()
            _load_experts(store, cfg, layout, moe_index, reader, prefix, rand, dtype, device)
            moe_index += 1
            router_fold.prepare(lw, cfg, layout.world_size, dtype, device)
        layers.append(lw)
    return ModelWeights(embed=embed, norm=norm, lm_head=lm_head, layers=layers, experts=store)


def _load_mla(lw: LayerWeights, get, p: str, cfg: ModelConfig) -> None:
    """DeepSeek's MLA projections, whole (TP reads its heads as views; see model/mla.py)."""
    H, nh, a = cfg.hidden_size, cfg.num_heads, p + "self_attn."
    q_out = nh * cfg.qk_head_dim
    kv_a = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    kv_b = nh * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    w = {}
    if cfg.q_lora_rank:
        r = cfg.q_lora_rank
        w["q_a_proj"] = get(a + "q_a_proj.weight", (r, H), scale=H**-0.5)
        w["q_a_layernorm"] = get(a + "q_a_layernorm.weight", (r,), ones=True)
        w["q_b_proj"] = get(a + "q_b_proj.weight", (q_out, r), scale=r**-0.5)
    else:
        w["q_proj"] = get(a + "q_proj.weight", (q_out, H), scale=H**-0.5)
    w["kv_a_proj_with_mqa"] = get(a + "kv_a_proj_with_mqa.weight", (kv_a, H), scale=H**-0.5)
    w["kv_a_layernorm"] = get(a + "kv_a_layernorm.weight", (cfg.kv_lora_rank,), ones=True)
    w["kv_b_proj"] = get(a + "kv_b_proj.weight", (kv_b, cfg.kv_lora_rank), scale=0.05)
    if cfg.attention_bias:
        raise ConfigError("MLA with attention_bias is not supported yet")
    lw.mla = w
    o_in = nh * cfg.v_head_dim
    lw.o_proj = get(a + "o_proj.weight", (H, o_in), scale=o_in**-0.5)


def _load_experts(store, cfg, layout, moe_index, reader, prefix, rand, dtype, device) -> None:
    I, H = cfg.moe_intermediate_size, cfg.hidden_size
    first = layout.first_local_expert(cfg.num_experts)
    for e in range(first, first + layout.num_local_experts(cfg.num_experts)):
        if reader is not None:
            gate_up, down = _read_expert(reader, prefix, e, cfg)
            if tuple(gate_up.shape) != (2 * I, H) or tuple(down.shape) != (H, I):
                raise ConfigError(f"expert {e} under {prefix} has the wrong shape")
        else:
            gate_up = rand.rnd(f"{prefix}{e}.gate_up", 2 * I, H, scale=H**-0.5)
            down = rand.rnd(f"{prefix}{e}.down", H, I, scale=I**-0.5)
        store.fill_expert(moe_index, layout, e, gate_up.to(device, dtype), down.to(device, dtype))
