"""Loads a Hugging Face checkpoint folder (single or sharded safetensors, per-expert or fused
expert tensors; Qwen3-MoE, Mixtral or DeepSeek-V2/V3 names) into one rank's ``ModelWeights``;
or fills them with random values from a config alone, for benchmarks of models whose weights
are not here.

One place knows the names: ``WeightWriter`` writes a tensor given by its Hugging Face name
into the rank's tensors (its slices of it, for the current layout). A load allocates the
weights and streams the checkpoint's tensors through it; a weight update (RL) streams new
tensors through the same writer into the live weights (moebius/engine/weight_update.py).
"""

from __future__ import annotations

import functools
import json
import os
import re
import zlib
from collections.abc import Mapping

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

    def shape(self, name: str) -> tuple:
        """A tensor's shape from the file's header, without reading it."""
        return tuple(self.handles[self.name_to_file[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        if name not in self.name_to_file:
            raise ConfigError(f"checkpoint lacks the tensor {name!r}")
        return self.handles[self.name_to_file[name]].get_tensor(name)


class _Random:
    """Random tensors of the right shape (benchmarks), seeded by name: every rank draws the
    same tensor whatever it loads."""

    def __init__(self, seed: int, device) -> None:
        self.seed = seed
        self.g = torch.Generator(device=device)
        self.device = device

    def rnd(self, name: str, *shape, scale: float) -> torch.Tensor:
        self.g.manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        t = torch.randn(*shape, generator=self.g, device=self.device, dtype=torch.float32)
        return t.mul_(scale)


_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight")
_EXPERT_PART = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up",
                "down_proj": "down", "w2": "down"}


def allocate_weights(cfg: ModelConfig, layout: Layout, dtype, device, tied: bool) -> ModelWeights:
    """One rank's weights, uninitialised: every tensor at the shape and place it keeps for the
    engine's life (dense whole, experts in ``layout``'s pieces)."""
    H, d = cfg.hidden_size, cfg.head_dim

    def empty(*shape, dt=dtype):
        return torch.empty(shape, dtype=dt, device=device)

    embed = empty(cfg.vocab_size, H)
    layers = []
    moe_index = 0
    for i in range(cfg.num_layers):
        lw = LayerWeights(input_norm=empty(H), post_norm=empty(H))
        if cfg.is_mla:
            nh = cfg.num_heads
            lw.mla = {k: empty(*shape) for k, shape in _mla_shapes(cfg).items()}
            lw.o_proj = empty(H, nh * cfg.v_head_dim)
        else:
            lw.qkv_proj = empty(cfg.q_size + 2 * cfg.kv_size, H)
            lw.q_proj, lw.k_proj, lw.v_proj = lw.qkv_proj.split(
                [cfg.q_size, cfg.kv_size, cfg.kv_size])
            lw.o_proj = empty(H, cfg.q_size)
        if cfg.qk_norm:
            lw.q_norm, lw.k_norm = empty(d), empty(d)
        if i in cfg.dense_layers:
            inter = cfg.dense_intermediate_size
            lw.dense = {"gate": empty(inter, H), "up": empty(inter, H), "down": empty(H, inter)}
        else:
            lw.router = empty(cfg.num_experts, H)
            lw.moe_index = moe_index
            moe_index += 1
            if cfg.num_shared_experts:
                inter = cfg.num_shared_experts * cfg.moe_intermediate_size
                lw.shared = {"gate": empty(inter, H), "up": empty(inter, H),
                             "down": empty(H, inter)}
            if cfg.scoring_func == "sigmoid":  # kept in float32, as transformers does
                lw.router_bias = empty(cfg.num_experts, dt=torch.float32)
        layers.append(lw)
    return ModelWeights(embed=embed, norm=empty(H), lm_head=embed if tied else empty(
        cfg.vocab_size, H), layers=layers, experts=ExpertStore(cfg, layout.world_size, dtype,
                                                                device))


def _mla_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    H, nh = cfg.hidden_size, cfg.num_heads
    q_out = nh * cfg.qk_head_dim
    shapes = {}
    if cfg.q_lora_rank:
        r = cfg.q_lora_rank
        shapes.update(q_a_proj=(r, H), q_a_layernorm=(r,), q_b_proj=(q_out, r))
    else:
        shapes["q_proj"] = (q_out, H)
    shapes["kv_a_proj_with_mqa"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim, H)
    shapes["kv_a_layernorm"] = (cfg.kv_lora_rank,)
    shapes["kv_b_proj"] = (nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
    return shapes


class WeightWriter:
    """Writes tensors given by Hugging Face name into one rank's ``ModelWeights`` (its slices:
    an expert's shards for the layout's pieces, only the experts the rank holds), checking
    each shape, and keeps which parts were written (``missing`` names the first of those a
    whole load still lacks)."""

    def __init__(self, cfg: ModelConfig, layout: Layout, weights: ModelWeights) -> None:
        self.cfg, self.layout, self.w = cfg, layout, weights
        E = cfg.num_experts
        first = layout.first_local_expert(E)
        self.local = range(first, first + layout.num_local_experts(E))
        self.written: set[str] = set()
        self._plain = [self._layer_names(lw) for lw in weights.layers]

    def _layer_names(self, lw: LayerWeights) -> dict[str, torch.Tensor]:
        """A layer's whole tensors by their names after ``model.layers.{i}.`` (the MoE parts
        aside: ``_moe_target``)."""
        cfg = self.cfg
        plain = {"input_layernorm.weight": lw.input_norm,
                 "post_attention_layernorm.weight": lw.post_norm,
                 "self_attn.o_proj.weight": lw.o_proj}
        if cfg.is_mla:
            plain.update({f"self_attn.{k}.weight": lw.mla[k] for k in lw.mla})
        else:
            plain.update({"self_attn.q_proj.weight": lw.q_proj,
                          "self_attn.k_proj.weight": lw.k_proj,
                          "self_attn.v_proj.weight": lw.v_proj})
        if cfg.qk_norm:
            plain.update({"self_attn.q_norm.weight": lw.q_norm,
                          "self_attn.k_norm.weight": lw.k_norm})
        plain.update({f"mlp.{k}_proj.weight": lw.dense[k] for k in lw.dense})
        return plain

    # ---------------------------------------------------------------- names
    def target(self, name: str):
        """What ``name`` writes here: (kind, detail), None for a name of this model that has
        no part on this rank (another rank's expert) or that it does not use (a tied head);
        KeyError for a name the model does not have."""
        cfg, w = self.cfg, self.w
        if name == "model.embed_tokens.weight":
            return ("tensor", w.embed, (cfg.vocab_size, cfg.hidden_size), "embed")
        if name == "model.norm.weight":
            return ("tensor", w.norm, (cfg.hidden_size,), "norm")
        if name == "lm_head.weight":
            if w.lm_head is w.embed:
                return None
            return ("tensor", w.lm_head, (cfg.vocab_size, cfg.hidden_size), "lm_head")
        m = _LAYER.fullmatch(name)
        if m is None or int(m.group(1)) >= cfg.num_layers:
            raise KeyError(name)
        i, rest = int(m.group(1)), m.group(2)
        lw, plain = w.layers[i], self._plain[i]
        if rest in plain:
            t = plain[rest]
            return ("tensor", t, tuple(t.shape), f"{i}.{rest}")
        if lw.router is None:
            raise KeyError(name)
        for prefix in ("mlp.", "block_sparse_moe."):
            if rest.startswith(prefix):
                return self._moe_target(lw, i, rest[len(prefix):], name)
        raise KeyError(name)

    def _moe_target(self, lw: LayerWeights, i: int, rest: str, name: str):
        cfg = self.cfg
        E, I, H = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        if rest == "gate.weight":
            return ("tensor", lw.router, (E, H), f"{i}.router")
        if rest == "gate.e_score_correction_bias" and lw.router_bias is not None:
            return ("tensor", lw.router_bias, (E,), f"{i}.router_bias")
        if rest.startswith("shared_experts.") and lw.shared:
            part = rest[len("shared_experts."):].removesuffix("_proj.weight")
            if part in lw.shared:
                t = lw.shared[part]
                return ("tensor", t, tuple(t.shape), f"{i}.shared.{part}")
        if rest == "experts.gate_up_proj":
            return ("fused", lw.moe_index, (E, 2 * I, H), i, ("gate", "up"))
        if rest == "experts.down_proj":
            return ("fused", lw.moe_index, (E, H, I), i, ("down",))
        m = _EXPERT.fullmatch(rest)
        if m is None or int(m.group(1)) >= E:
            raise KeyError(name)
        e, part = int(m.group(1)), _EXPERT_PART[m.group(2)]
        if e not in self.local:
            return None
        shape = (H, I) if part == "down" else (I, H)
        return ("expert", lw.moe_index, shape, i, e, part)

    def wanted(self, name: str) -> bool:
        """Whether ``name`` is this model's and writes something on this rank."""
        try:
            return self.target(name) is not None
        except KeyError:
            return False

    # ---------------------------------------------------------------- writing
    def check(self, name: str, shape: tuple):
        """``name``'s target (``target``) if it is this model's with this shape, else
        ConfigError (a name with no part here passes: None)."""
        try:
            t = self.target(name)
        except KeyError:
            raise ConfigError(f"{name!r} is not a weight of this model") from None
        if t is not None and tuple(shape) != t[2]:
            raise ConfigError(f"tensor {name} has shape {tuple(shape)}, expected {t[2]}")
        return t

    def parts_of(self, t) -> set[str]:
        """The parts a target (``target``) writes on this rank (see ``parts``)."""
        if t is None:
            return set()
        if t[0] == "tensor":
            return {t[3]}
        if t[0] == "fused":
            return {f"{t[3]}.expert{e}.{p}" for e in self.local for p in t[4]}
        return {f"{t[3]}.expert{t[4]}.{t[5]}"}

    def assign(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` (any device and float dtype) where ``name`` goes on this rank."""
        t = self.check(name, tensor.shape)
        if t is None:
            return
        store, layout = self.w.experts, self.layout
        if t[0] == "tensor":
            t[1].copy_(tensor)
        elif t[0] == "fused":
            I = self.cfg.moe_intermediate_size
            for e in self.local:
                if t[4] == ("down",):
                    store.fill_part(t[1], layout, e, "down", tensor[e])
                else:
                    store.fill_part(t[1], layout, e, "gate", tensor[e, :I])
                    store.fill_part(t[1], layout, e, "up", tensor[e, I:])
        else:
            store.fill_part(t[1], layout, t[4], t[5], tensor)
        self.written |= self.parts_of(t)

    def parts(self) -> list[tuple[str, str]]:
        """(part, a name that writes it) for every part a whole load writes on this rank, in
        a canonical naming (Qwen3-MoE's; random weights are drawn under these names)."""
        cfg, out = self.cfg, [("embed", "model.embed_tokens.weight"),
                              ("norm", "model.norm.weight")]
        if self.w.lm_head is not self.w.embed:
            out.append(("lm_head", "lm_head.weight"))
        for i, lw in enumerate(self.w.layers):
            p = f"model.layers.{i}."
            rests = ["input_layernorm.weight", "post_attention_layernorm.weight",
                     "self_attn.o_proj.weight"]
            rests += [f"self_attn.{k}.weight" for k in lw.mla] if cfg.is_mla else [
                f"self_attn.{k}_proj.weight" for k in "qkv"]
            if cfg.qk_norm:
                rests += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
            rests += [f"mlp.{k}_proj.weight" for k in lw.dense]
            out += [(f"{i}.{r}", p + r) for r in rests]
            if lw.router is None:
                continue
            out.append((f"{i}.router", p + "mlp.gate.weight"))
            if lw.router_bias is not None:
                out.append((f"{i}.router_bias", p + "mlp.gate.e_score_correction_bias"))
            out += [(f"{i}.shared.{k}", f"{p}mlp.shared_experts.{k}_proj.weight")
                    for k in lw.shared]
            out += [(f"{i}.expert{e}.{k}", f"{p}mlp.experts.{e}.{k}_proj.weight")
                    for e in self.local for k in ("gate", "up", "down")]
        return out

    def require_whole(self, written: set[str] | None = None) -> None:
        """ConfigError naming the first part a whole load has not written (``written``: these
        parts, else the ones written so far)."""
        done = self.written if written is None else written
        missing = next((name for part, name in self.parts() if part not in done), None)
        if missing is not None:
            raise ConfigError(f"checkpoint lacks the tensor {missing!r} (or its fused form)")


def update_plan(writer: WeightWriter, source) -> list[tuple[str, object]]:
    """The writes of a weight update on this rank, checked before any is made: (name, a
    function that gives the tensor). ``source``: a checkpoint folder (whole: ConfigError for
    a tensor that is missing, misshapen or not this model's) or (name, tensor) pairs / a dict
    (any subset of the model's names; an unknown name or a wrong shape is a ConfigError)."""
    if isinstance(source, str):
        reader = CheckpointReader(source)
        names = [n for n in reader.name_to_file if writer.wanted(n)]
        parts: set[str] = set()
        for n in names:
            parts |= writer.parts_of(writer.check(n, reader.shape(n)))
        writer.require_whole(parts)
        return [(n, functools.partial(reader.get, n)) for n in names]
    pairs = list(source.items() if isinstance(source, Mapping) else source)
    return [(n, functools.partial(_same, t)) for n, t in pairs
            if writer.check(n, t.shape) is not None]


def _same(t):
    return t


def _init_scale(name: str, shape: tuple, cfg: ModelConfig) -> float | None:
    """The random init of a canonical name: None for ones (norms), else the std."""
    if "norm" in name:
        return None
    if name == "model.embed_tokens.weight":
        return 1.0
    if name.endswith("e_score_correction_bias"):
        return 0.01
    if name.endswith("kv_b_proj.weight"):
        return 0.05
    return shape[1] ** -0.5


def load_weights(
    cfg: ModelConfig,
    model_dir: str | None,
    layout: Layout,
    dtype: torch.dtype,
    device: str | torch.device,
    seed: int = 0,
) -> ModelWeights:
    """Weights for one rank: dense whole, experts in ``layout``'s pieces."""
    if cfg.is_mla and cfg.attention_bias:
        raise ConfigError("MLA with attention_bias is not supported yet")
    reader = CheckpointReader(model_dir) if model_dir else None
    tied = cfg.tie_word_embeddings or (reader is not None and not reader.has("lm_head.weight"))
    weights = allocate_weights(cfg, layout, dtype, device, tied)
    writer = WeightWriter(cfg, layout, weights)
    if reader is not None:
        for name in reader.name_to_file:
            if writer.wanted(name):
                writer.assign(name, reader.get(name))
        writer.require_whole()
    else:
        rand = _Random(seed, device)
        for _, name in writer.parts():
            shape = writer.target(name)[2]
            scale = _init_scale(name, shape, cfg)
            writer.assign(name, torch.ones(shape) if scale is None else
                          rand.rnd(name, *shape, scale=scale))
    for lw in weights.layers:
        if lw.router is not None:
            router_fold.prepare(lw, cfg, layout.world_size, dtype, device)
    return weights
