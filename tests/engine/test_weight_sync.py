"""Weight updates over a trainer's process group (gloo here, NCCL on GPUs): the trainer's
``WeightSender`` broadcasts a state dict, every engine rank receives it into place, and the
engine answers as one started on that checkpoint; a bad spec is refused before anything is
received."""

from __future__ import annotations

import socket
import threading

import pytest

from moebius import LLM, SamplingParams
from moebius.engine.weight_sync import GroupSource, WeightSender
from tests.conftest import PROMPTS
from tests.engine.test_weight_update import state_dict

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tokens(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def concurrently(fn, *args):
    """Run ``fn`` in a thread (the engine's side of a rendezvous); join with ``.join()``."""
    box = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised by the caller
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()

    def join():
        t.join(120)
        assert not t.is_alive(), "the engine side did not finish"
        if "error" in box:
            raise box["error"]
        return box.get("value")

    t.join_result = join
    return t


@pytest.mark.parametrize("ranks,layout", [(1, "tp"), (2, "ep"), (2, "tp")])
def test_trainer_broadcasts_a_checkpoint(ranks, layout, qwen_dir, qwen_b_dir):
    with LLM(qwen_b_dir) as ref:
        want = tokens(ref)
    port = free_port()
    with LLM(qwen_dir, ranks=ranks, layout=layout) as llm:
        before = tokens(llm)
        joining = concurrently(llm.join_weight_group, "127.0.0.1", port, ranks + 1)
        sender = WeightSender("127.0.0.1", port, num_engine_ranks=ranks, timeout_s=60)
        joining.join_result()
        with pytest.raises(ValueError, match="not a weight"):  # refused before any receive
            llm.update_weights(GroupSource((("model.layers.0.nonsense", "float32", (4,)),)))
        sd = state_dict(qwen_b_dir)
        updating = concurrently(llm.update_weights, GroupSource.of(sd.items()))
        sender.send(sd.items())
        rec = updating.join_result()
        assert rec.version == 1 and "over the trainer's group" in rec.source
        assert tokens(llm) == want != before
        back = state_dict(qwen_dir)  # and again, over the same group
        updating = concurrently(llm.update_weights, GroupSource.of(back.items()))
        sender.send(back.items())
        updating.join_result()
        assert tokens(llm) == before
