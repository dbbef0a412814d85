"""The embedded demo: a tiny random Qwen3-MoE checkpoint written locally, served on two CPU
ranks over gloo, switching TP -> EP -> TP while requests are in flight; then the same prompts
on one rank without switching, and the tokens compared.
"""

from __future__ import annotations

import os
import time

from moebius.config import EngineConfig, ModelConfig
from moebius.core import SamplingParams
from moebius.engine.llm_engine import LLMEngine
from moebius.model.tiny import default_checkpoint_dir, write_tiny_checkpoint

PROMPTS = [
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):",
    "Once upon a time there was a small language model",
    "What is the capital of France?",
    "Tensor parallelism splits every matrix across devices;",
]


def _run(engine: LLMEngine, params: SamplingParams, verbose: bool) -> dict[str, list[int]]:
    ids = [engine.add_request(p, params) for p in PROMPTS]
    done: dict[str, list[int]] = {}
    last_layout = engine.layout
    while len(done) < len(ids):
        outs = engine.step()
        if verbose:
            if engine.layout != last_layout:
                rec = engine.switches[-1]
                print(
                    f"  >>> switched {rec.source.upper()} -> {rec.target.upper()} before step "
                    f"{rec.step}: {rec.running} requests in flight kept, "
                    f"{rec.weight_bytes / 1e6:.2f} MB of experts + {rec.kv_bytes / 1e3:.1f} KB "
                    f"of KV moved in {rec.seconds * 1e3:.0f} ms"
                )
                last_layout = engine.layout
            s = engine.stats()
            lens = " ".join(f"{len(o.outputs[0].token_ids):2d}" for o in outs)
            print(
                f"  step {s['steps']:3d}  layout={engine.layout.upper()}  "
                f"running={s['running']}  tokens so far: {lens}"
            )
        for o in outs:
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
    return {i: done[i] for i in ids}


def run_demo(model_dir: str | None = None, ranks: int = 2, steps: int = 24) -> bool:
    model_dir = model_dir or default_checkpoint_dir()
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        write_tiny_checkpoint(model_dir)
        print(f"wrote a tiny random Qwen3-MoE checkpoint to {model_dir}")
    model = ModelConfig.from_dir(model_dir)
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    schedule = ((4, "ep"), (9, "tp"), (14, "ep"), (18, "tp"))
    cfg = EngineConfig(
        model=model,
        model_dir=model_dir,
        ranks=ranks,
        layout="tp",
        switch_schedule=schedule,
        max_num_batched_tokens=32,
    )
    print(f"\n== {ranks} CPU ranks over gloo, starting in TP, switch schedule {list(schedule)}")
    t0 = time.perf_counter()
    engine = LLMEngine(cfg)
    try:
        switched = _run(engine, params, verbose=True)
        print(f"   {len(engine.switches)} switches, {time.perf_counter() - t0:.1f} s in all")
    finally:
        engine.shutdown()
    print("\n== reference: 1 rank, no switch")
    single = LLMEngine(EngineConfig(model=model, model_dir=model_dir))
    reference = _run(single, params, verbose=False)
    single.shutdown()
    same = list(switched.values()) == list(reference.values())
    for p, toks in zip(PROMPTS, switched.values(), strict=True):
        print(f"  {p[:40]!r:44} -> {single.tokenizer.decode(toks)[:40]!r}")
    print(
        f"\ngreedy tokens with {len(engine.switches)} live switches == single rank without "
        f"switching: {same}"
    )
    if not same:
        raise SystemExit("demo failed: switching changed the output")
    return same
