"""Cost model: the time of one engine step (and of one layout switch) from the work it does.

Per layer and phase, per rank, the GPU time is a sum of linear terms whose constants live in a
JSON profile (``profiles/h200.json``, or one written by ``moebius sim calibrate``):

- fixed per-layer latency (kernel count; CUDA-graph replay), an extra one per layer of latent
  attention (MLA), and an extra one under EP (routing, padding, gather/scatter of the exchange);
- HBM reads: attention weights (TP: this rank's head slice; EP: whole; MLA: the latent
  projection whole, the per-head ones sliced), the distinct experts the step's tokens activate
  (memory-bound weight reads; the uniform-routing expectation, or the count a routing trace
  gives), shared experts, router, dense MLP, lm_head;
- KV reads by attention (batch × context × local KV heads), at their own bandwidth;
- FLOPs (compute-bound GEMMs: expert GEMMs by tokens per expert and width, projections,
  attention scores, lm_head);
- collectives: TP all-reduces (attention o_proj and MoE), EP all-gather + reduce-scatter, each a
  latency that grows with log2(ranks) plus bytes on the wire over the link's bandwidth (NVLink
  inside a node, InfiniBand across nodes).

The latency and read costs come in two sets. The probe's (``layer_latency_s``,
``hbm_s_per_byte``, ``kv_s_per_byte``: DESIGN.md's lean probe) with the session-1 engine's extra
kernels on top (``engine_layer_latency_s``), which is how the model began; and the engine's own
(``Profile.engine``, ``EngineTerms``), fitted to the current engine's single-GPU steps, which
replace the probe's rather than add to them: the engine's fused kernels made it faster than the
probe, which a non-negative extra cannot express. ``Profile.gpu_constants`` picks the set: the
engine's where the profile has them. The EP and collective constants are the probe's either way
(the engine's multi-GPU steps are unmeasured).

A step's time is the slowest rank's GPU time plus host time (scheduling, inputs, sampling: a
fixed part and a part per sequence); in eager mode the host's kernel launches overlap the GPU, so
the step takes the larger of the two. Switch time: owner-changed expert bytes and KV bytes over
the point-to-point link, plus the copy out of the staging slot.

Shape legend: N ranks, E experts, k top-k, I expert intermediate, H hidden, L layers, e bytes
per element, T tokens in the step.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace

from moebius.config import ModelConfig
from moebius.parallel.layout import Layout
from moebius.parallel.reshard import owner_changed_expert_bytes

PROFILE_DIR = os.path.join(os.path.dirname(__file__), "profiles")
# profile constant -> the feature (computed below) it multiplies; GPU time = Σ constant·feature
GPU_TERMS = {
    "layer_latency_s": "layers",
    "ep_layer_latency_s": "ep_layers",
    "engine_layer_latency_s": "engine_layers",
    "mla_layer_latency_s": "mla_layers",  # EngineTerms only (0 without them)
    "hbm_s_per_byte": "weight_bytes",
    "kv_s_per_byte": "kv_bytes",
    "s_per_flop": "flops",
    "coll_latency_s": "coll_hops",
    "coll_s_per_byte": "coll_bytes",
}


@dataclass(frozen=True)
class Link:
    """One direction of a link, per GPU: bytes/s and per-message latency."""

    bandwidth: float
    latency_s: float = 0.0


@dataclass(frozen=True)
class EngineTerms:
    """The engine's own GPU constants, fitted to its measured single-GPU steps. They replace
    the probe's per-layer latency and weight-read cost (and KV-read cost, where fitted) instead
    of adding to them."""

    layer_latency_s: float  # per layer: the engine's kernels, in a CUDA graph
    hbm_s_per_byte: float  # weight reads; 1/value is the effective read bandwidth
    mla_layer_latency_s: float = 0.0  # extra per layer of latent attention (DeepSeek's path)
    # KV reads; None: the probe's (fitted over two contexts; rows of one context cannot tell
    # KV reads from other per-token work)
    kv_s_per_byte: float | None = None


@dataclass(frozen=True)
class Profile:
    """Fitted constants of one machine (see GPU_TERMS) and its host and link figures."""

    name: str
    layer_latency_s: float
    ep_layer_latency_s: float
    hbm_s_per_byte: float
    kv_s_per_byte: float
    s_per_flop: float
    coll_latency_s: float  # per collective per log2(N), inside a CUDA graph
    coll_s_per_byte: float  # per byte on the wire of an NVLink collective
    host_step_s: float  # per step: scheduling, input prep, sampling, messages
    host_per_seq_s: float  # per sequence in the batch
    eager_layer_s: float  # host launch time per layer without CUDA graphs
    launch: str = "graph"  # "graph" or "eager"
    engine_layer_latency_s: float = 0.0  # the engine's kernels beyond the lean probe's
    p2p: Link = Link(360e9, 20e-6)  # switch transfers inside a node (NCCL send/recv)
    inter_node: Link = Link(50e9, 10e-6)  # 400 Gb/s InfiniBand per GPU
    gpus_per_node: int = 8
    gpu_memory_bytes: float = 141e9
    sources: dict = field(default_factory=dict)  # constant -> the measured figure it comes from
    engine: EngineTerms | None = None  # None: the probe's constants + engine_layer_latency_s

    @classmethod
    def load(cls, name_or_path: str = "h200") -> Profile:
        path = name_or_path
        if not os.path.exists(path):
            path = os.path.join(PROFILE_DIR, f"{name_or_path}.json")
        with open(path) as f:
            d = json.load(f)
        d["p2p"], d["inter_node"] = Link(**d["p2p"]), Link(**d["inter_node"])
        if d.get("engine") is not None:  # profiles written before EngineTerms have none
            d["engine"] = EngineTerms(**d["engine"])
        return cls(**d)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(asdict(self), f, indent=2)
            f.write("\n")

    def with_(self, **kw) -> Profile:
        return replace(self, **kw)

    def gpu_constants(self) -> dict[str, float]:
        """Every GPU_TERMS constant as this profile prices an engine step: the probe's plus the
        session-1 engine's extra latency, or where ``engine`` is set, its latency and read
        costs in place of the probe's (EP and collective constants: the probe's either way)."""
        c = {k: getattr(self, k) for k in GPU_TERMS if k != "mla_layer_latency_s"}
        c["mla_layer_latency_s"] = 0.0
        e = self.engine
        if e is not None:
            c.update(
                layer_latency_s=e.layer_latency_s,
                engine_layer_latency_s=0.0,
                mla_layer_latency_s=e.mla_layer_latency_s,
                hbm_s_per_byte=e.hbm_s_per_byte,
            )
            if e.kv_s_per_byte is not None:
                c["kv_s_per_byte"] = e.kv_s_per_byte
        return c


@dataclass
class RankWork:
    """One rank's share of a step (under TP every rank has the same share)."""

    num_seqs: int = 0  # sequences sampled this step
    num_tokens: int = 0  # tokens computed (decode: 1 a sequence; prefill: the chunk)
    kv_tokens: int = 0  # Σ context tokens attended by decode tokens
    attn_pairs: int = 0  # Σ query·key pairs (prefill chunks' attention compute)
    # distinct experts per MoE layer the step's tokens pick, when known (a routing trace);
    # None: the expectation under uniform routing (``distinct_experts``)
    active_experts: float | None = None


def attention_params(m: ModelConfig, q_heads: int, kv_heads: int) -> int:
    """Attention weights (elements) one rank reads a layer, holding ``q_heads`` query heads
    and ``kv_heads`` KV heads. MLA: the latent projections (q_a, kv_a) are whole on every rank,
    q_b, kv_b and o_proj are the rank's heads (model/mla.py)."""
    H = m.hidden_size
    if not m.is_mla:
        return (2 * q_heads + 2 * kv_heads) * m.head_dim * H
    q = q_heads * m.qk_head_dim
    q = H * m.q_lora_rank + m.q_lora_rank * q if m.q_lora_rank else H * q
    kv_a = H * (m.kv_lora_rank + m.qk_rope_head_dim)
    kv_b = m.kv_lora_rank * q_heads * (m.qk_nope_head_dim + m.v_head_dim)
    return q + kv_a + kv_b + q_heads * m.v_head_dim * H


def distinct_experts(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts that ``tokens`` uniform top-k picks activate."""
    return num_experts * (1 - (1 - top_k / num_experts) ** tokens)


class CostModel:
    """Step and switch times of one engine instance of ``ranks`` GPUs running ``model``."""

    def __init__(
        self,
        model: ModelConfig,
        ranks: int,
        profile: Profile,
        elem_size: int = 2,
        coll_link: Link | None = None,
    ) -> None:
        """``coll_link``: the link collectives run over (default: the profile's NVLink inside
        a node, its InfiniBand across nodes)."""
        self.m, self.n, self.p, self.e = model, ranks, profile, elem_size
        self.constants = profile.gpu_constants()
        self.num_nodes = math.ceil(ranks / profile.gpus_per_node)
        # Collectives spanning nodes run at the slower link (one NIC a GPU), with its latency.
        self.coll_link = coll_link or (profile.inter_node if self.num_nodes > 1 else None)

    # ---------------------------------------------------------------- features (per rank)
    def features(self, layout: str, work: RankWork, total_tokens: int, max_tokens: int) -> dict:
        """The linear features of one rank's GPU time: bytes, FLOPs, collectives, layers."""
        m, n, e = self.m, self.n, self.e
        ly = Layout(layout if n > 1 else "tp", 0, n)
        H, L, hd = m.hidden_size, m.num_layers, m.head_dim
        ep = layout == "ep" and n > 1
        qh = len(ly.q_heads(m))
        kvh = ly.num_local_kv_heads(m)
        has = work.num_tokens > 0
        attn_params = attention_params(m, qh, kvh)
        moe_layers = len(m.moe_layers)
        expert_params = 3 * m.moe_intermediate_size * H
        dense_params = 3 * m.dense_intermediate_size * H // (1 if ep else n)
        # shared experts: every token's, sliced like the dense MLP under TP
        shared_params = m.num_shared_experts * expert_params // (1 if ep else n)
        active = work.active_experts
        if active is None:
            active = distinct_experts(m.num_experts, m.top_k, total_tokens)
        local_experts = active / n
        w = (
            (attn_params * L if has else 0)
            + moe_layers * (local_experts * expert_params + m.num_experts * H)
            + (moe_layers * shared_params if has else 0)
            + (L - moe_layers) * dense_params
        )
        lm_rows = work.num_seqs  # TP: the shared work carries every sequence
        w += m.vocab_size * H if lm_rows else 0
        flops = 2 * work.num_tokens * (attn_params * L + m.num_experts * H * moe_layers)
        flops += 2 * total_tokens * m.top_k * expert_params * moe_layers / n
        flops += 2 * work.num_tokens * shared_params * moe_layers
        flops += 2 * (L - moe_layers) * work.num_tokens * dense_params
        flops += 4 * qh * hd * L * (work.kv_tokens + work.attn_pairs)
        flops += 2 * lm_rows * m.vocab_size * H
        hops = bytes_ = 0.0
        if n > 1:
            lg = math.log2(n)
            if ep:  # all-gather x, ids, weights; reduce-scatter; padded to the largest rank
                size = n * max_tokens * H * e
                hops = 4 * lg * moe_layers
                bytes_ = 2 * (n - 1) / n * size * moe_layers
            else:  # all-reduce after attention and after the MLP
                size = total_tokens * H * e
                hops = 2 * lg * L
                bytes_ = 2 * L * 2 * (n - 1) / n * size
        return {
            "layers": L,
            "engine_layers": L,
            "mla_layers": L if m.is_mla else 0,
            "ep_layers": moe_layers if ep else 0,
            "weight_bytes": w * e,
            "kv_bytes": work.kv_tokens * L * m.kv_planes * kvh * hd * e,
            "flops": flops,
            "coll_hops": hops,
            "coll_bytes": bytes_,
        }

    def gpu_time(self, feats: dict) -> float:
        p, c = self.p, self.constants
        t = sum(
            c[k] * feats[f]
            for k, f in GPU_TERMS.items()
            if k not in ("coll_s_per_byte", "coll_latency_s")
        )
        lat, per_byte = p.coll_latency_s, p.coll_s_per_byte
        if self.coll_link is not None:
            # a user link keeps the fitted efficiency at decode-sized messages, rescaled from
            # the NVLink send/recv rate the fit was made at (p2p) to the link's rate
            lat += self.coll_link.latency_s
            per_byte = p.coll_s_per_byte * p.p2p.bandwidth / self.coll_link.bandwidth
        return t + lat * feats["coll_hops"] + per_byte * feats["coll_bytes"]

    def host_time(self, num_seqs: int) -> float:
        return self.p.host_step_s + self.p.host_per_seq_s * num_seqs

    # ---------------------------------------------------------------- steps
    def step_time(self, layout: str, works: list[RankWork]) -> float:
        """Seconds of one step; ``works`` has one entry per rank (EP) or one shared (TP)."""
        if self.n == 1 or layout == "tp":
            works = works[:1]
        total = sum(w.num_tokens for w in works)
        seqs = sum(w.num_seqs for w in works)
        mx = max((w.num_tokens for w in works), default=0)
        gpu = max(self.gpu_time(self.features(layout, w, total, mx)) for w in works)
        launch = self.m.num_layers * self.p.eager_layer_s if self.p.launch == "eager" else 0.0
        return max(gpu, launch) + self.host_time(seqs)

    def decode_step_time(self, layout: str, batch: int, context: int) -> float:
        """A pure decode step of ``batch`` sequences of ``context`` tokens, balanced ranks."""
        if layout == "ep" and self.n > 1:
            per = [batch // self.n + (r < batch % self.n) for r in range(self.n)]
            works = [RankWork(b, b, b * context) for b in per]
        else:
            works = [RankWork(batch, batch, batch * context)]
        return self.step_time(layout, works)

    # ---------------------------------------------------------------- switches
    def switch_time(self, kv_bytes_per_rank: float = 0.0) -> float:
        """Seconds of a switch: each rank sends its owner-changed expert bytes in N-1 paired
        rounds per layer, copies them out of the staging slot, and sends its KV share."""
        if self.n == 1:
            return 0.0
        link = self.p.p2p if self.n <= self.p.gpus_per_node else self.p.inter_node
        per_rank = owner_changed_expert_bytes(self.m, self.n, self.e) / self.n
        msgs = len(self.m.moe_layers) * (self.n - 1)
        stage = 2 * per_rank * self.p.hbm_s_per_byte
        return (per_rank + kv_bytes_per_rank) / link.bandwidth + msgs * link.latency_s + stage

    # ---------------------------------------------------------------- memory
    def memory_bytes(self) -> dict:
        """Per-rank weight bytes: ours (whole attention on every rank, both layouts) against a
        static TP engine (attention sharded) and a static EP engine (same as ours)."""
        m, n, e = self.m, self.n, self.e
        H = m.hidden_size
        attn = attention_params(m, m.num_heads, m.num_kv_heads) * m.num_layers * e
        experts = 3 * m.moe_intermediate_size * H * m.num_experts * len(m.moe_layers) * e / n
        dense = 3 * m.dense_intermediate_size * H * (m.num_layers - len(m.moe_layers)) * e
        dense += 3 * m.moe_intermediate_size * H * m.num_shared_experts * len(m.moe_layers) * e
        other = 2 * m.vocab_size * H * e + m.num_experts * H * len(m.moe_layers) * e
        stage = experts / len(m.moe_layers) / n if n > 1 else 0.0
        kvh = Layout("tp", 0, n).num_local_kv_heads(m)  # replicated when kv heads < N
        tp_attn = attention_params(m, m.num_heads // n, kvh) * m.num_layers * e
        ours = attn + experts + dense + other + stage
        return {
            "ours": ours,
            "static_tp": tp_attn + experts + dense / n + other,
            "static_ep": attn + experts + dense + other,
            "staging": stage,
        }
