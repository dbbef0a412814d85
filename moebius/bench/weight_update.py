"""How long an in-place weight update takes (RL between rollouts): a random checkpoint of a
chosen size is written twice (A, B); an engine starts on A, then takes B as a folder and as
a state dict, each timed (wall, and the slowest rank's check and write), with the greedy
tokens checked against an engine started on B. Prints a table; ``--out`` writes JSON.

    python -m moebius.bench.weight_update --ranks 1 2 --hidden 512 --layers 8 --experts 32
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from safetensors.torch import load_file

from moebius import LLM, SamplingParams
from moebius.model.tiny import write_tiny_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = ["Hello, world!", "The quick brown fox jumps over the lazy dog."]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--layouts", nargs="+", default=["tp", "ep"])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--moe-intermediate", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    shapes = dict(hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_experts=args.experts, moe_intermediate_size=args.moe_intermediate,
                  intermediate_size=4 * args.hidden, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=args.hidden // 8)
    tmp = tempfile.mkdtemp(prefix="moebius-wu-")
    a = write_tiny_checkpoint(os.path.join(tmp, "a"), seed=1, **shapes)
    b = write_tiny_checkpoint(os.path.join(tmp, "b"), seed=2, fused_experts=True, **shapes)
    sd_b = {}
    for f in os.listdir(b):
        if f.endswith(".safetensors"):
            sd_b.update(load_file(os.path.join(b, f)))
    mb = sum(t.numel() * t.element_size() for t in sd_b.values()) / 1e6
    with LLM(b, device=args.device) as ref:
        want = [o.outputs[0].token_ids for o in ref.generate(PROMPTS, GREEDY)]
    rows = []
    for ranks in args.ranks:
        for layout in args.layouts if ranks > 1 else ["tp"]:
            with LLM(a, ranks=ranks, layout=layout, device=args.device) as llm:
                for kind, source in (("folder", b), ("state dict", sd_b), ("back to A", a)):
                    t0 = time.perf_counter()
                    rec = llm.update_weights(source)
                    wall = time.perf_counter() - t0
                    ok = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
                    rows.append(dict(ranks=ranks, layout=layout, source=kind, wall_s=wall,
                                     check_s=rec.check_seconds, write_s=rec.write_seconds,
                                     tokens_ok=(ok == want) if kind != "back to A" else None,
                                     startup_s=llm.engine.startup_seconds))
    print(f"checkpoint {mb:.0f} MB ({args.layers} layers, {args.experts} experts, hidden "
          f"{args.hidden}, float32), device {args.device}")
    print(f"{'ranks':>5} {'layout':>6} {'source':>10} {'wall s':>7} {'check s':>8} "
          f"{'write s':>8} {'start s':>8} tokens = B's")
    for r in rows:
        print(f"{r['ranks']:>5} {r['layout']:>6} {r['source']:>10} {r['wall_s']:>7.3f} "
              f"{r['check_s']:>8.3f} {r['write_s']:>8.3f} {r['startup_s']:>8.2f} "
              f"{'' if r['tokens_ok'] is None else r['tokens_ok']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"checkpoint_mb": mb, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
