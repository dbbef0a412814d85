"""Configuration dataclasses: the model (read from a Hugging Face config.json), the engine's
cache, scheduler and parallel settings, and model presets by name for benchmarks.

Every dataclass validates itself on construction, so a bad value fails at start-up with one
clear message naming the field, never deep inside a forward pass.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

SUPPORTED_ARCHITECTURES = (
    "Qwen3MoeForCausalLM",
    "MixtralForCausalLM",
    "DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM",
)
DEEPSEEK_ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")


class ConfigError(ValueError):
    """A configuration or checkpoint problem the user can fix."""


@dataclass(frozen=True)
class ModelConfig:
    """The shapes and options of a decoder-only MoE model (Qwen3-MoE, Mixtral, DeepSeek-V2/V3).

    DeepSeek's multi-head latent attention (MLA) caches one latent per token: the pool sees it
    as a single KV head (``num_kv_heads`` 1) of ``head_dim`` = kv_lora_rank + qk_rope_head_dim
    values in one plane (no separate V), so layouts replicate it under TP like any KV head.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    dense_intermediate_size: int = 0
    dense_layers: tuple[int, ...] = ()  # layers whose MLP is dense (Qwen3 mlp_only_layers)
    norm_topk_prob: bool = True
    qk_norm: bool = False
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "bfloat16"
    # DeepSeek (zero / defaults elsewhere); see model/deepseek.py and model/mla.py
    q_lora_rank: int = 0  # 0: q_proj straight from the hidden state (V2-Lite)
    kv_lora_rank: int = 0  # > 0: multi-head latent attention
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False  # rotary pairs (x0, x1), (x2, x3), ... as DeepSeek lays them
    rope_scaling: tuple[tuple[str, object], ...] = ()  # YaRN parameters from config.json
    num_shared_experts: int = 0
    routed_scaling_factor: float = 1.0
    scoring_func: str = "softmax"  # "sigmoid" (V3: with e_score_correction_bias)
    topk_method: str = "greedy"  # "group_limited_greedy" (V2), "noaux_tc" (V3)
    num_expert_groups: int = 1
    topk_group: int = 1

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "num_experts",
            "top_k",
            "moe_intermediate_size",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"model config: {name} must be positive, got {getattr(self, name)}"
                )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.top_k > self.num_experts:
            raise ConfigError("num_experts_per_tok exceeds the number of experts")
        if self.num_experts % self.num_expert_groups or self.topk_group > self.num_expert_groups:
            raise ConfigError("n_group must divide n_routed_experts and be >= topk_group")
        if self.is_mla and self.head_dim != self.kv_lora_rank + self.qk_rope_head_dim:
            raise ConfigError("an MLA model's head_dim is kv_lora_rank + qk_rope_head_dim")

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def kv_planes(self) -> int:
        """Planes per KV slot: 2 (K and V) or 1 (MLA's latent)."""
        return 1 if self.is_mla else 2

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.dense_layers)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, hf: dict) -> ModelConfig:
        archs = hf.get("architectures") or []
        if not archs:
            raise ConfigError("config.json has no 'architectures' entry")
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported architecture {arch!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if arch in DEEPSEEK_ARCHITECTURES and rope_type == "yarn":
            pass  # model/mla.py computes YaRN
        elif rope_type not in ("default", None):
            raise ConfigError(f"rope type {rope.get('rope_type')!r} is not supported yet")
        rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        num_layers = hf["num_hidden_layers"]
        base = dict(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            top_k=hf["num_experts_per_tok"],
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"),
        )
        num_experts = hf.get("num_experts") or hf.get("num_local_experts")
        if arch in DEEPSEEK_ARCHITECTURES:
            return cls._deepseek(hf, base, rope if rope_type == "yarn" else {})
        if arch == "Qwen3MoeForCausalLM":
            step = hf.get("decoder_sparse_step", 1)
            mlp_only = set(hf.get("mlp_only_layers") or [])
            dense = tuple(i for i in range(num_layers) if i in mlp_only or (i + 1) % step != 0)
            return cls(
                **base,
                num_experts=num_experts,
                moe_intermediate_size=hf["moe_intermediate_size"],
                dense_intermediate_size=hf.get("intermediate_size", 0),
                dense_layers=dense,
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                qk_norm=True,
                attention_bias=bool(hf.get("attention_bias", False)),
            )
        return cls(  # Mixtral: every layer sparse, renormalised top-k, no q/k norm
            **base,
            num_experts=num_experts,
            moe_intermediate_size=hf["intermediate_size"],
            norm_topk_prob=True,
        )

    @classmethod
    def _deepseek(cls, hf: dict, base: dict, yarn: dict) -> ModelConfig:
        v3 = base["architecture"] == "DeepseekV3ForCausalLM"
        hf = {**(_DEEPSEEK_V3_DEFAULTS if v3 else _DEEPSEEK_V2_DEFAULTS), **hf}
        kv_lora, rope_dim = hf["kv_lora_rank"], hf["qk_rope_head_dim"]
        scaling = {k: v for k, v in yarn.items() if k not in ("type", "rope_theta")}
        num_dense = min(hf.get("first_k_dense_replace") or 0, base["num_layers"])
        if scaling:
            scaling["rope_type"] = "yarn"
        return cls(
            **{**base, "num_kv_heads": 1, "head_dim": kv_lora + rope_dim},
            num_experts=hf["n_routed_experts"],
            moe_intermediate_size=hf["moe_intermediate_size"],
            dense_intermediate_size=hf["intermediate_size"],
            dense_layers=tuple(range(num_dense)),
            norm_topk_prob=bool(hf.get("norm_topk_prob")) and v3,  # transformers' V2 ignores it
            q_lora_rank=hf.get("q_lora_rank") or 0,
            kv_lora_rank=kv_lora,
            qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=rope_dim,
            v_head_dim=hf["v_head_dim"],
            rope_interleave=bool(hf.get("rope_interleave", True)) if v3 else True,
            rope_scaling=tuple(sorted(scaling.items())),
            num_shared_experts=hf.get("n_shared_experts") or 0,
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            scoring_func="sigmoid" if v3 else "softmax",
            topk_method="noaux_tc" if v3 else (hf.get("topk_method") or "greedy"),
            num_expert_groups=hf.get("n_group") or 1,
            topk_group=hf.get("topk_group") or 1,
            attention_bias=bool(hf.get("attention_bias", False)),
        )

    @classmethod
    def from_dir(cls, model_dir: str) -> ModelConfig:
        path = os.path.join(model_dir, "config.json")
        if not os.path.isdir(model_dir):
            raise ConfigError(f"model directory {model_dir!r} does not exist")
        if not os.path.isfile(path):
            raise ConfigError(f"{model_dir!r} has no config.json")
        try:
            with open(path) as f:
                hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        try:
            return cls.from_hf_dict(hf)
        except KeyError as e:
            raise ConfigError(f"{path} lacks the field {e.args[0]!r}") from e


# transformers' defaults for fields a DeepSeek config.json may leave out
_DEEPSEEK_V2_DEFAULTS = dict(
    n_shared_experts=2, routed_scaling_factor=1.0, first_k_dense_replace=0, topk_method="greedy"
)
_DEEPSEEK_V3_DEFAULTS = dict(
    n_shared_experts=1,
    routed_scaling_factor=2.5,
    first_k_dense_replace=3,
    n_group=8,
    topk_group=4,
    norm_topk_prob=True,
)

# Model shapes for benchmarks and the simulator (random weights where real ones are not here).
PRESETS: dict[str, dict] = {
    "qwen3-30b-a3b": dict(
        architectures=["Qwen3MoeForCausalLM"],
        vocab_size=151936,
        hidden_size=2048,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        intermediate_size=6144,
        norm_topk_prob=True,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        max_position_embeddings=40960,
        eos_token_id=151645,
        dtype="bfloat16",
    ),
    "qwen3-235b-a22b": dict(
        architectures=["Qwen3MoeForCausalLM"],
        vocab_size=151936,
        hidden_size=4096,
        num_hidden_layers=94,
        num_attention_heads=64,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=1536,
        intermediate_size=12288,
        norm_topk_prob=True,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        max_position_embeddings=40960,
        eos_token_id=151645,
        dtype="bfloat16",
    ),
    "mixtral-8x7b": dict(
        architectures=["MixtralForCausalLM"],
        vocab_size=32000,
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        num_local_experts=8,
        num_experts_per_tok=2,
        intermediate_size=14336,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        max_position_embeddings=32768,
        eos_token_id=2,
        dtype="bfloat16",
    ),
    "deepseek-v2-lite": dict(
        architectures=["DeepseekV2ForCausalLM"],
        vocab_size=102400,
        hidden_size=2048,
        num_hidden_layers=27,
        num_attention_heads=16,
        num_key_value_heads=16,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        moe_intermediate_size=1408,
        intermediate_size=10944,
        first_k_dense_replace=1,
        topk_method="greedy",
        routed_scaling_factor=1.0,
        rope_theta=10000.0,
        rope_scaling=dict(
            type="yarn",
            factor=40,
            beta_fast=32,
            beta_slow=1,
            mscale=0.707,
            mscale_all_dim=0.707,
            original_max_position_embeddings=4096,
        ),
        rms_norm_eps=1e-6,
        max_position_embeddings=163840,
        bos_token_id=100000,
        eos_token_id=100001,
        dtype="bfloat16",
    ),
    "deepseek-v3": dict(
        architectures=["DeepseekV3ForCausalLM"],
        vocab_size=129280,
        hidden_size=7168,
        num_hidden_layers=61,
        num_attention_heads=128,
        num_key_value_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=256,
        n_shared_experts=1,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        norm_topk_prob=True,
        moe_intermediate_size=2048,
        intermediate_size=18432,
        first_k_dense_replace=3,
        routed_scaling_factor=2.5,
        rope_theta=10000.0,
        rope_scaling=dict(
            type="yarn",
            factor=40,
            beta_fast=32,
            beta_slow=1,
            mscale=1.0,
            mscale_all_dim=1.0,
            original_max_position_embeddings=4096,
        ),
        rms_norm_eps=1e-6,
        max_position_embeddings=163840,
        bos_token_id=0,
        eos_token_id=1,
        dtype="bfloat16",
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A model config by preset name, e.g. ``preset("qwen3-30b-a3b", num_hidden_layers=12)``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return ModelConfig.from_hf_dict({**PRESETS[name], **overrides})


LAYOUTS = ("tp", "ep")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs besides the model: cache, scheduler and parallel settings."""

    model: ModelConfig
    model_dir: str | None = None  # None: random weights from the config
    ranks: int = 1
    layout: str = "tp"  # initial layout: "tp" or "ep" (equal when ranks == 1)
    policy: str = "manual"  # "manual" (switch() and switch_schedule only) or "auto"
    progressive_layers: int = 0  # > 0: a switch moves this many layers per step (stall-free)
    ep_exchange: str = "allgather"  # EP tokens: "allgather" (+ reduce-scatter) or "alltoall"
    device: str = "cpu"  # "cpu" or "cuda"
    dtype: str = "auto"  # "auto" (checkpoint dtype; float32 on CPU), "float32", "bfloat16", ...
    block_size: int = 16
    num_kv_blocks: int | None = None  # per rank, EP view; None: sized from kv_cache_memory
    kv_cache_memory: float = 0.0  # bytes per rank for the KV pool; 0: a default by device
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    # vLLM's --scheduling-policy: "fcfs" (arrival order) or "priority" (each request's
    # ``priority``, lower first, then arrival: the order of admission, and the last preempted)
    scheduling_policy: str = "fcfs"
    seed: int = 0
    switch_schedule: tuple[tuple[int, str], ...] = ()  # (engine step, layout) pairs
    enforce_eager: bool = False
    chat_template: str | None = None  # a file or the Jinja text; None: the checkpoint's
    # schedule step N+1 while step N runs on the device (its tokens stay there as N+1's
    # inputs): None = on for CUDA (docs/async-scheduling.md)
    async_scheduling: bool | None = None
    dist_backend: str | None = None  # None: nccl on cuda, gloo on cpu
    master_port: int = 0  # 0: pick a free port

    def __post_init__(self) -> None:
        if self.ranks < 1:
            raise ConfigError("ranks must be >= 1")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.ep_exchange not in ("allgather", "alltoall"):
            raise ConfigError(
                f"ep_exchange must be 'allgather' or 'alltoall', got {self.ep_exchange!r}"
            )
        if self.policy not in ("manual", "auto"):
            raise ConfigError(f"policy must be 'manual' or 'auto', got {self.policy!r}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ConfigError(f"scheduling_policy must be 'fcfs' or 'priority', got "
                              f"{self.scheduling_policy!r}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ConfigError("block_size must be a positive power of two")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < self.block_size:
            raise ConfigError("max_num_seqs must be >= 1 and max_num_batched_tokens >= block_size")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.kv_cache_memory < 0 or (self.num_kv_blocks is not None and self.num_kv_blocks < 1):
            raise ConfigError("kv_cache_memory must be >= 0 and num_kv_blocks >= 1")
        m = self.model
        if self.ranks > 1:
            if m.num_experts % self.ranks:
                raise ConfigError(
                    f"{m.num_experts} experts cannot be split over {self.ranks} ranks"
                )
            if m.moe_intermediate_size % self.ranks:
                raise ConfigError("moe_intermediate_size must divide by the number of ranks")
            if m.num_heads % self.ranks:
                raise ConfigError("num_attention_heads must divide by the number of ranks")
            kv = m.num_kv_heads
            if kv % self.ranks and self.ranks % kv:
                raise ConfigError("num_key_value_heads and ranks must divide one another")
            if m.dense_layers and m.dense_intermediate_size % self.ranks:
                raise ConfigError("intermediate_size must divide by the number of ranks")
        for step, layout in self.switch_schedule:
            if layout not in LAYOUTS or step < 0:
                raise ConfigError(f"bad switch_schedule entry {(step, layout)!r}")
        if self.max_model_len is not None and self.max_model_len > m.max_position_embeddings:
            raise ConfigError(
                f"max_model_len {self.max_model_len} exceeds the model's "
                f"max_position_embeddings {m.max_position_embeddings}"
            )

    @property
    def overlap_steps(self) -> bool:
        """Whether the engine overlaps scheduling with the device."""
        return self.device == "cuda" if self.async_scheduling is None else self.async_scheduling

    @property
    def context_len(self) -> int:
        return self.max_model_len or self.model.max_position_embeddings

    def with_(self, **kw) -> EngineConfig:
        return replace(self, **kw)


@dataclass
class ParallelInfo:
    """Set once per worker process: who am I among the ranks."""

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
