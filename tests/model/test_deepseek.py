"""DeepSeek-V2/V3 on one device against transformers' own DeepseekV2ForCausalLM and
DeepseekV3ForCausalLM (tiny random checkpoints: MLA with and without q_lora, YaRN, shared
experts, group-limited routing, a dense first layer), plus the routing and rope pieces."""

from __future__ import annotations

import pytest
import torch

from moebius import LLM, SamplingParams
from moebius.config import ModelConfig, preset
from moebius.kv.pool import KVPool
from moebius.model.deepseek import route
from moebius.model.mla import rope_inv_freq, softmax_scale
from moebius.model.tiny import write_tiny_checkpoint
from moebius.model.weights import LayerWeights
from tests.conftest import PROMPTS, hf_greedy

MAX_NEW = 24


@pytest.fixture(scope="session")
def deepseek_dirs(tmp_path_factory) -> dict[str, str]:
    return {
        arch: write_tiny_checkpoint(str(tmp_path_factory.mktemp(arch)), arch, seed=3)
        for arch in ("deepseek_v2", "deepseek_v3")
    }


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_greedy_tokens_equal_transformers(arch, deepseek_dirs):
    model_dir = deepseek_dirs[arch]
    llm = LLM(model_dir, max_num_batched_tokens=32)  # small budget: chunked prefill in play
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    ref, _ = hf_greedy(model_dir, ids, MAX_NEW)
    outs = llm.generate(ids, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True))
    for o, r in zip(outs, ref, strict=True):
        assert o.outputs[0].token_ids == r
    llm.shutdown()


def _hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_routing_and_rope_match_transformers(arch, deepseek_dirs):
    """Router ids/weights (group-limited, bias, scaling) and YaRN tables, piece by piece."""
    model_dir = deepseek_dirs[arch]
    cfg = ModelConfig.from_dir(model_dir)
    model = _hf_model(model_dir)
    gate = model.model.layers[1].mlp.gate
    x = torch.randn(50, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    lw = LayerWeights(input_norm=None, post_norm=None, router=gate.weight.detach())
    if cfg.scoring_func == "sigmoid":
        lw.router_bias = gate.e_score_correction_bias.detach()
    ids, weights = route(x, lw, cfg)
    with torch.no_grad():
        _, ref_w, ref_ids = gate(x)
    order, ref_order = ids.argsort(-1), ref_ids.argsort(-1)
    assert torch.equal(ids.gather(1, order), ref_ids.gather(1, ref_order))
    torch.testing.assert_close(weights.gather(1, order), ref_w.gather(1, ref_order).float())
    inv_freq, factor = rope_inv_freq(cfg)
    rot = model.model.rotary_emb
    torch.testing.assert_close(inv_freq, rot.inv_freq)
    assert factor == pytest.approx(rot.attention_scaling)
    assert softmax_scale(cfg) == pytest.approx(model.model.layers[0].self_attn.scaling)


def test_presets_and_latent_pool():
    v2, v3 = preset("deepseek-v2-lite"), preset("deepseek-v3")
    assert (v2.num_kv_heads, v2.head_dim, v2.kv_planes) == (1, 576, 1)
    assert v2.q_lora_rank == 0 and v2.dense_layers == (0,) and v2.num_shared_experts == 2
    assert v3.dense_layers == (0, 1, 2) and v3.topk_method == "noaux_tc" and v3.topk_group == 4
    # 576 values per token per layer, one plane: 27 layers x 576 x 2 bytes per token
    assert KVPool.bytes_per_block(v2, 1, 2) == 27 * 576 * 2
