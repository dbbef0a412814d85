"""transformers' own ``generate`` on the same random-weight model shapes, for comparison.

python -m moebius.bench.hf_baseline --preset qwen3-30b-a3b --batches 1 64 --new-tokens 16
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from moebius.config import PRESETS


def main() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    hf = dict(PRESETS[args.preset])
    model_type = "qwen3_moe" if hf["architectures"][0].startswith("Qwen3") else "mixtral"
    cfg = AutoConfig.for_model(model_type, **{k: v for k, v in hf.items() if k != "dtype"})
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.eval()
    rows = []
    for B in args.batches:
        x = torch.randint(0, cfg.vocab_size, (B, args.prompt_len), device="cuda")
        kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
        with torch.no_grad():
            model.generate(x, max_new_tokens=2, min_new_tokens=2, **kw)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            model.generate(
                x, max_new_tokens=1 + args.new_tokens, min_new_tokens=1 + args.new_tokens, **kw
            )
            torch.cuda.synchronize()
            t2 = time.perf_counter()
        step = ((t2 - t1) - (t1 - t0)) / args.new_tokens
        rows.append({"batch": B, "step_ms": step * 1e3, "tokens_per_s": B / step})
        print(json.dumps(rows[-1]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"preset": args.preset, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
