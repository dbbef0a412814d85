"""The engine's own host time per decode step (scheduling, bookkeeping, outputs), without the
model: after a real prefill, the executor is replaced by one that answers at once, so each
``engine.step()`` is only the Python around the forward. Runs on the CPU, no GPU needed; the
runner's input building and sampling are not in it (``profile_step --host`` covers those on
CUDA).

    python -m moebius.bench.host_step --batches 1 16 64 256 --steps 50
    python -m moebius.bench.host_step --batches 256 --steps 4000 --segments 4  # growth with
        # the tokens generated: ms/step over each quarter of the run, streamed outputs
    python -m moebius.bench.host_step --message 2048 --blocks 64  # a rank's decode message:
        # pickle + unpickle with whole block tables and with the blocks appended since
"""

from __future__ import annotations

import argparse
import gc
import json
import pickle
import random
import statistics
import time

import torch

from moebius.bench.decode import random_batch_engine
from moebius.config import preset
from moebius.engine import gc_tuning
from moebius.engine.messages import SampledToken, SeqWork, StepInput, StepResult

# a one-layer model of tiny shapes: the prefill is cheap, the host work is the same
TINY = dict(num_hidden_layers=1, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
            num_experts_per_tok=2, vocab_size=512)


def _answer_at_once(inputs):
    return [StepResult(0, [SampledToken(s.request_id, 7) for s in inputs[0].seqs if s.sample])]


def host_ms(batch: int, prompt_len: int, steps: int, segments: int = 1) -> list[float]:
    """Mean ms of ``steps`` decode steps of ``batch`` requests with a null executor, over each
    of ``segments`` equal parts of the run (the mean: garbage collections land in a few
    steps, which a median would hide). Every step reports every request (as streaming does)."""
    model = preset("qwen3-30b-a3b", **TINY)
    engine = random_batch_engine(
        model, batch, prompt_len=prompt_len, max_tokens=steps + 20, device="cpu",
        dtype="float32", num_kv_blocks=batch * ((prompt_len + steps) // 16 + 4) + 64,
        max_num_batched_tokens=batch * prompt_len, max_model_len=prompt_len + steps + 40)
    engine.step()  # the whole prefill, real
    engine.executor.step = _answer_at_once
    for _ in range(5):
        engine.step()
    per, out = steps // segments, []
    for _ in range(segments):
        t = time.perf_counter()
        for _ in range(per):
            engine.step()
        out.append((time.perf_counter() - t) / per * 1e3)
    engine.shutdown()
    return out


def message_ms(num_seqs: int, max_blocks: int, delta: bool) -> dict:
    """Median ms to pickle and unpickle one rank's decode ``StepInput`` of ``num_seqs``
    sequences holding max_blocks/4 to max_blocks blocks (block size 16), with whole tables or
    with the blocks appended since the step before (one block a sequence every 16 steps)."""
    rng = random.Random(0)
    seqs = []
    for i in range(num_seqs):
        blocks = [rng.randrange(1 << 20) for _ in range(rng.randrange(max_blocks // 4, max_blocks))]
        pos = (len(blocks) - 1) * 16 + rng.randrange(16)
        tail = blocks[-1:] if pos % 16 == 0 else []
        seqs.append(SeqWork(f"req-{i}", [rng.randrange(1000)], pos, tail if delta else blocks,
                            True, 0.0, 0, 1.0, 0.0, i, pos, -1, [], -1, None,
                            len(blocks) - len(tail) if delta else 0))
    msg = StepInput("tp", seqs, [num_seqs], decode_only=True)
    dumps, loads = [], []
    for _ in range(9):
        t = time.perf_counter()
        data = pickle.dumps(msg, 5)
        dumps.append(time.perf_counter() - t)
        t = time.perf_counter()
        pickle.loads(data)
        loads.append(time.perf_counter() - t)
    return {"pickle_ms": statistics.median(dumps) * 1e3,
            "unpickle_ms": statistics.median(loads) * 1e3, "bytes": len(data)}


def _write(rows: list[dict], path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--segments", type=int, default=1,
                    help="report ms/step over each of N parts of one run (tuned GC only)")
    ap.add_argument("--message", type=int, default=0,
                    help="time a decode message of this many sequences instead")
    ap.add_argument("--blocks", type=int, default=64, help="with --message: most blocks a table")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.message:
        rows = [{"tables": name, **message_ms(args.message, args.blocks, delta)}
                for name, delta in (("whole", False), ("appended", True))]
        for r in rows:
            print(f"{args.message} sequences, {r['tables']} tables: pickle {r['pickle_ms']:.2f} "
                  f"ms, unpickle {r['unpickle_ms']:.2f} ms, {r['bytes'] / 1e6:.3f} MB")
        return _write(rows, args.out)
    if args.segments > 1:
        rows = [{"batch": B, "segment_ms": host_ms(B, args.prompt_len, args.steps, args.segments)}
                for B in args.batches]
        for r in rows:
            print(f"batch {r['batch']:4d}: ms/step by segment "
                  + " ".join(f"{m:.2f}" for m in r["segment_ms"]))
        return _write(rows, args.out)
    python_default, tuned = gc.get_threshold(), gc_tuning.GEN0
    rows = []
    for B in args.batches:
        row = {"batch": B}
        for name, gen0 in (("tuned", tuned), ("python_default", 0)):
            gc.set_threshold(*python_default)  # the engine applies gc_tuning.GEN0 itself
            gc_tuning.GEN0 = gen0
            row[f"{name}_ms"] = sorted(host_ms(B, args.prompt_len, args.steps)[0]
                                       for _ in range(3))[1]
        gc_tuning.GEN0 = tuned
        rows.append(row)
        print(f"batch {B:4d}: engine host {row['tuned_ms']:.2f} ms/step "
              f"(with Python's GC threshold: {row['python_default_ms']:.2f})")
    _write(rows, args.out)


if __name__ == "__main__":
    main()
