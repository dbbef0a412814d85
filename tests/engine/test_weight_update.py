"""In-place weight updates (RL between rollouts): after ``update_weights(B)`` an engine started
on checkpoint A answers exactly as one started on B (greedy tokens and the weights' bytes), in
either layout and across a switch, with every buffer at its address and the prefix cache
dropped; B's state dict given as tensors does the same, in pieces too; another model's
checkpoint, a broken one, an unknown name or a wrong shape is refused and the weights stay."""

from __future__ import annotations

import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from moebius import LLM, SamplingParams
from tests.conftest import PROMPTS

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def tokens(llm, prompts=PROMPTS):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]


@pytest.fixture(scope="module")
def reference_b(qwen_b_dir):
    with LLM(qwen_b_dir) as llm:
        return tokens(llm), llm.engine.executor.call("weights_digest")[0]


@pytest.mark.parametrize("ranks,layout", [(1, "tp"), (2, "tp"), (2, "ep")])
def test_update_gives_the_new_checkpoints_answers(ranks, layout, qwen_dir, qwen_b_dir,
                                                  reference_b):
    want, digest_b = reference_b
    with LLM(qwen_dir, ranks=ranks, layout=layout, async_scheduling=ranks > 1) as llm:
        before = tokens(llm)  # also fills the prefix cache with A's KV of these prompts
        assert before != want
        addrs = llm.engine.executor.call("buffer_addresses")
        rec = llm.update_weights(qwen_b_dir)
        assert rec.version == 1 and rec.error is None and llm.engine.stats()[
            "weights_version"] == 1
        assert llm.engine.executor.call("buffer_addresses") == addrs
        assert tokens(llm) == want  # no cached A KV reused
        if ranks == 1:
            assert llm.engine.executor.call("weights_digest")[0] == digest_b
        else:
            llm.switch("ep" if layout == "tp" else "tp")
            assert tokens(llm) == want  # the switch moves B's slices
            assert len(llm.engine.switches) == 1
        llm.update_weights(qwen_dir)
        assert tokens(llm) == before and llm.engine.weights_version == 2


def test_refused_checkpoints_leave_the_weights(qwen_dir, mixtral_dir, qwen_b_dir, tmp_path,
                                               reference_b):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(qwen_b_dir):  # the config of the same model, no weights
        if "safetensors" not in name:
            shutil.copy(os.path.join(qwen_b_dir, name), broken / name)
    short = tmp_path / "short"
    shutil.copytree(broken, short)
    sd = state_dict(qwen_b_dir)
    del sd["model.layers.2.mlp.experts.down_proj"]
    save_file(sd, str(short / "model.safetensors"))
    with LLM(qwen_dir, ranks=2, layout="ep") as llm:
        before = tokens(llm)
        with pytest.raises(ValueError, match="lacks the tensor 'model.layers.2.mlp.experts"):
            llm.update_weights(str(short))
        with pytest.raises(ValueError, match="another model"):
            llm.update_weights(mixtral_dir)
        with pytest.raises(ValueError, match="no model.safetensors"):
            llm.update_weights(str(broken))
        with pytest.raises(ValueError, match="cannot read"):
            llm.update_weights(str(tmp_path / "nowhere"))
        assert llm.engine.weights_version == 0
        assert [r.error is not None for r in llm.engine.weight_updates] == [True, True]
        assert tokens(llm) == before


def test_a_requested_update_waits_for_the_running_requests(qwen_dir, qwen_b_dir, reference_b):
    """The server's path: requests running when the update is asked finish under A, requests
    admitted after it run under B."""
    want, _ = reference_b
    with LLM(qwen_dir) as llm:
        engine = llm.engine
        old = tokens(llm)
        ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
        engine.step()  # admitted and running under A
        engine.request_weight_update(qwen_b_dir)
        late = [engine.add_request(p, GREEDY) for p in PROMPTS]
        with pytest.raises(ValueError, match="already waiting"):
            engine.request_weight_update(qwen_b_dir)
        done = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
        assert [done[i] for i in ids] == old
        assert [done[i] for i in late] == want
        assert engine.weights_version == 1 and not engine.scheduler.paused


def state_dict(model_dir: str) -> dict:
    out = {}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(model_dir, name)))
    return out


@pytest.mark.parametrize("layout", ["tp", "ep"])
def test_named_tensors_in_pieces(layout, qwen_dir, qwen_b_dir, reference_b):
    """B's tensors as (name, tensor) pairs in two halves (fused experts, as a trainer holding
    them fused sends them), then A's per-expert tensors back as a dict."""
    want, _ = reference_b
    sd_b = list(state_dict(qwen_b_dir).items())
    with LLM(qwen_dir, ranks=2, layout=layout) as llm:
        before = tokens(llm)
        half = len(sd_b) // 2
        llm.update_weights(sd_b[:half])
        mixed = tokens(llm)
        assert mixed != before and mixed != want  # half A, half B
        rec = llm.update_weights(sd_b[half:])
        assert tokens(llm) == want and rec.version == 2
        assert rec.source == f"{len(sd_b) - half} tensors"
        llm.update_weights(state_dict(qwen_dir))
        assert tokens(llm) == before


def test_bad_named_tensors_change_nothing(qwen_dir, qwen_b_dir):
    sd_b = state_dict(qwen_b_dir)
    name = "model.layers.0.self_attn.q_proj.weight"
    with LLM(qwen_dir, ranks=2, layout="ep") as llm:
        before = tokens(llm)
        for bad, match in (({**sd_b, "model.layers.0.mlp.nonsense": sd_b[name]}, "not a weight"),
                           ({**sd_b, name: sd_b[name][:, :-1]}, "has shape"),
                           ({"model.layers.99.input_layernorm.weight": sd_b[name]},
                            "not a weight")):
            with pytest.raises(ValueError, match=match):
                llm.update_weights(bad)
        assert tokens(llm) == before and llm.engine.weights_version == 0
