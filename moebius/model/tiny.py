"""Writes a tiny random MoE checkpoint in Hugging Face's exact format (config.json,
safetensors single or sharded, tokenizer.json, tokenizer_config.json with a ChatML chat
template), so everything runs and is tested with no download.

The tokenizer is a byte-level BPE trained, deterministically, on a small embedded corpus.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (  # ChatML; enable_thinking=False opens an empty think block, as Qwen3's
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}"
)
_CORPUS = """
The quick brown fox jumps over the lazy dog. A mixture of experts routes every token to a few
experts out of many, so a large model costs little per token. Tensor parallelism splits every
matrix across devices; expert parallelism gives each device whole experts. Hello, world! How are
you today? I am fine, thank you. What is the capital of France? Paris is the capital of France.
def add(a, b):
    return a + b
for i in range(10):
    print(i * i)
The cache holds keys and values of earlier tokens so that decoding is cheap. Once upon a time
there was a small language model that wanted to serve many users at once. Numbers: 0 1 2 3 4 5
6 7 8 9 10 100 1000. Science, history, music, art, code, mathematics and sport are topics.
"""


def train_tokenizer(vocab_size: int = 384) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tok


TINY_SHAPES = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    intermediate_size=128,
)


def hf_config(arch: str, vocab_size: int, eos_id: int, **shapes) -> dict:
    s = {**TINY_SHAPES, **shapes}
    common = dict(
        vocab_size=vocab_size,
        hidden_size=s["hidden_size"],
        num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_key_value_heads"],
        head_dim=s["head_dim"],
        num_experts_per_tok=s["num_experts_per_tok"],
        hidden_act="silu",
        max_position_embeddings=s.get("max_position_embeddings", 2048),
        rms_norm_eps=1e-6,
        rope_theta=s.get("rope_theta", 10000.0),
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos_id,
        initializer_range=0.02,
        torch_dtype="float32",
    )
    if arch == "qwen3_moe":
        return dict(
            architectures=["Qwen3MoeForCausalLM"],
            model_type="qwen3_moe",
            num_experts=s["num_experts"],
            moe_intermediate_size=s["moe_intermediate_size"],
            intermediate_size=s["intermediate_size"],
            decoder_sparse_step=1,
            mlp_only_layers=s.get("mlp_only_layers", []),
            norm_topk_prob=s.get("norm_topk_prob", True),
            attention_bias=False,
            **common,
        )
    if arch == "mixtral":
        return dict(
            architectures=["MixtralForCausalLM"],
            model_type="mixtral",
            num_local_experts=s["num_experts"],
            intermediate_size=s["moe_intermediate_size"],
            **common,
        )
    if arch in ("deepseek_v2", "deepseek_v3"):
        return deepseek_config(arch, common, **shapes)
    raise ValueError(
        f"unknown tiny architecture {arch!r}: use qwen3_moe, mixtral, deepseek_v2 or deepseek_v3"
    )


DEEPSEEK_TINY_SHAPES = dict(
    num_hidden_layers=3,
    num_attention_heads=4,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    num_experts=8,
    n_group=4,
    topk_group=2,
    first_k_dense_replace=1,
)


def deepseek_config(arch: str, common: dict, **shapes) -> dict:
    """A tiny DeepSeek config.json. V2 as the hub writes it (legacy ``rope_scaling`` with YaRN,
    no q_lora, group-limited greedy routing); V3 as transformers saves it (``rope_parameters``
    with YaRN, q_lora, sigmoid routing with a correction bias, interleaved rope)."""
    v3 = arch == "deepseek_v3"
    s = {**TINY_SHAPES, **DEEPSEEK_TINY_SHAPES, **shapes}
    nh = s["num_attention_heads"]
    yarn = dict(
        factor=4.0,
        beta_fast=32,
        beta_slow=1,
        mscale=1.0 if v3 else 0.9,  # V2: unequal, so the cos/sin factor is not 1
        mscale_all_dim=1.0 if v3 else 0.707,
        original_max_position_embeddings=512,
    )
    common = {k: v for k, v in common.items() if k not in ("rope_theta", "head_dim")}
    common.update(num_hidden_layers=s["num_hidden_layers"], num_attention_heads=nh)
    cfg = dict(
        architectures=["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        model_type=arch,
        **{**common, "num_key_value_heads": nh},
        q_lora_rank=s.get("q_lora_rank", 48) if v3 else s.get("q_lora_rank"),
        kv_lora_rank=s["kv_lora_rank"],
        qk_nope_head_dim=s["qk_nope_head_dim"],
        qk_rope_head_dim=s["qk_rope_head_dim"],
        v_head_dim=s["v_head_dim"],
        n_routed_experts=s["num_experts"],
        n_shared_experts=s.get("n_shared_experts", 1 if v3 else 2),
        moe_intermediate_size=s["moe_intermediate_size"],
        intermediate_size=s["intermediate_size"],
        first_k_dense_replace=s["first_k_dense_replace"],
        n_group=s["n_group"],
        topk_group=s["topk_group"],
        routed_scaling_factor=s.get("routed_scaling_factor", 2.5 if v3 else 1.5),
        norm_topk_prob=v3,
        attention_bias=False,
    )
    if v3:
        cfg.update(
            rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, **yarn),
            rope_interleave=True,
        )
    else:
        cfg.update(
            topk_method="group_limited_greedy",
            rope_theta=10000.0,
            rope_scaling=dict(type="yarn", **yarn),
        )
    return cfg


def deepseek_state_dict(cfg: dict, rnd) -> dict:
    """Random DeepSeek weights under Hugging Face's names (experts per expert, as saved)."""
    H, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    nh, r_kv, dr = cfg["num_attention_heads"], cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    dq = cfg["qk_nope_head_dim"] + dr
    dkv = cfg["qk_nope_head_dim"] + cfg["v_head_dim"]
    E, inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    sd = {"model.embed_tokens.weight": rnd(V, H, scale=1.0), "model.norm.weight": 1 + rnd(H)}
    sd["lm_head.weight"] = rnd(V, H, scale=H**-0.5 * 4)

    def mlp(prefix: str, i: int) -> None:
        sd[prefix + "gate_proj.weight"] = rnd(i, H, scale=H**-0.5)
        sd[prefix + "up_proj.weight"] = rnd(i, H, scale=H**-0.5)
        sd[prefix + "down_proj.weight"] = rnd(H, i, scale=i**-0.5)

    for layer in range(L):
        p = f"model.layers.{layer}."
        a = p + "self_attn."
        sd[p + "input_layernorm.weight"] = 1 + rnd(H)
        sd[p + "post_attention_layernorm.weight"] = 1 + rnd(H)
        if cfg.get("q_lora_rank"):
            rq = cfg["q_lora_rank"]
            sd[a + "q_a_proj.weight"] = rnd(rq, H, scale=H**-0.5)
            sd[a + "q_a_layernorm.weight"] = 1 + rnd(rq)
            sd[a + "q_b_proj.weight"] = rnd(nh * dq, rq, scale=rq**-0.5)
        else:
            sd[a + "q_proj.weight"] = rnd(nh * dq, H, scale=H**-0.5)
        sd[a + "kv_a_proj_with_mqa.weight"] = rnd(r_kv + dr, H, scale=H**-0.5)
        sd[a + "kv_a_layernorm.weight"] = 1 + rnd(r_kv)
        sd[a + "kv_b_proj.weight"] = rnd(nh * dkv, r_kv, scale=r_kv**-0.5)
        sd[a + "o_proj.weight"] = rnd(H, nh * cfg["v_head_dim"], scale=(nh * dkv) ** -0.5)
        if layer < cfg["first_k_dense_replace"]:
            mlp(p + "mlp.", cfg["intermediate_size"])
            continue
        sd[p + "mlp.gate.weight"] = rnd(E, H, scale=H**-0.5 * 2)
        if cfg["model_type"] == "deepseek_v3":
            sd[p + "mlp.gate.e_score_correction_bias"] = rnd(E, scale=0.05)
        for e in range(E):
            mlp(f"{p}mlp.experts.{e}.", inter)
        mlp(p + "mlp.shared_experts.", inter * cfg["n_shared_experts"])
    return sd


def random_state_dict(cfg: dict, seed: int, fused_experts: bool, std: float = 0.1) -> dict:
    """Random weights under Hugging Face's names (per-expert, or fused 3-D expert tensors)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=std):
        return torch.randn(*shape, generator=g) * scale

    if cfg["model_type"].startswith("deepseek"):
        return deepseek_state_dict(cfg, rnd)
    H, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    nh, nkv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    qwen = cfg["model_type"] == "qwen3_moe"
    E = cfg["num_experts"] if qwen else cfg["num_local_experts"]
    inter = cfg["moe_intermediate_size"] if qwen else cfg["intermediate_size"]

    sd = {"model.embed_tokens.weight": rnd(V, H, scale=1.0), "model.norm.weight": 1 + rnd(H)}
    sd["lm_head.weight"] = rnd(V, H, scale=H**-0.5 * 4)
    for i in range(L):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + rnd(H)
        sd[p + "post_attention_layernorm.weight"] = 1 + rnd(H)
        sd[p + "self_attn.q_proj.weight"] = rnd(nh * d, H, scale=H**-0.5)
        sd[p + "self_attn.k_proj.weight"] = rnd(nkv * d, H, scale=H**-0.5)
        sd[p + "self_attn.v_proj.weight"] = rnd(nkv * d, H, scale=H**-0.5)
        sd[p + "self_attn.o_proj.weight"] = rnd(H, nh * d, scale=(nh * d) ** -0.5)
        if qwen:
            sd[p + "self_attn.q_norm.weight"] = 1 + rnd(d)
            sd[p + "self_attn.k_norm.weight"] = 1 + rnd(d)
        if qwen and i in cfg.get("mlp_only_layers", []):
            I = cfg["intermediate_size"]
            sd[p + "mlp.gate_proj.weight"] = rnd(I, H, scale=H**-0.5)
            sd[p + "mlp.up_proj.weight"] = rnd(I, H, scale=H**-0.5)
            sd[p + "mlp.down_proj.weight"] = rnd(H, I, scale=I**-0.5)
            continue
        moe = p + ("mlp." if qwen or fused_experts else "block_sparse_moe.")
        sd[moe + "gate.weight"] = rnd(E, H, scale=H**-0.5 * 2)
        gate, up = rnd(E, inter, H, scale=H**-0.5), rnd(E, inter, H, scale=H**-0.5)
        down = rnd(E, H, inter, scale=inter**-0.5)
        if fused_experts:
            sd[moe + "experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
            sd[moe + "experts.down_proj"] = down
            continue
        names = ("gate_proj", "up_proj", "down_proj") if qwen else ("w1", "w3", "w2")
        for e in range(E):
            for name, w in zip(names, (gate[e], up[e], down[e]), strict=True):
                sd[f"{moe}experts.{e}.{name}.weight"] = w.clone()
    return sd


def write_tiny_checkpoint(
    path: str,
    arch: str = "qwen3_moe",
    seed: int = 0,
    num_shards: int = 1,
    fused_experts: bool = False,
    topics: int = 0,
    **shapes,
) -> str:
    """Write a tiny random checkpoint folder at ``path`` and return the path. ``topics=K``:
    synthetic expert locality (model/topics.py)."""
    os.makedirs(path, exist_ok=True)
    tok = train_tokenizer()
    tok.save(os.path.join(path, "tokenizer.json"))
    eos_id = tok.token_to_id("<|im_end|>")
    vocab = (tok.get_vocab_size() + 63) // 64 * 64
    cfg = hf_config(arch, vocab, eos_id, **shapes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": eos_id}, f, indent=2)
    tok_cfg = dict(
        chat_template=CHATML_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        add_bos_token=False,
        model_max_length=cfg["max_position_embeddings"],
        tokenizer_class="PreTrainedTokenizerFast",
    )
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=2)
    sd = random_state_dict(cfg, seed, fused_experts)
    if topics:
        from moebius.model.topics import apply_topics

        sd = apply_topics(sd, cfg, topics, seed)
    _save_shards(path, sd, num_shards)
    return path


def _save_shards(path: str, sd: dict, num_shards: int) -> None:
    meta = {"format": "pt"}
    if num_shards <= 1:
        save_file(sd, os.path.join(path, "model.safetensors"), metadata=meta)
        return
    names = sorted(sd)
    weight_map = {}
    for s in range(num_shards):
        fname = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: sd[n].contiguous() for n in names[s::num_shards]}
        save_file(part, os.path.join(path, fname), metadata=meta)
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)


def default_checkpoint_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "moebius", "tiny-qwen3-moe")
