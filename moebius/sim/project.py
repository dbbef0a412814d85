"""``moebius sim project``: the headline projections, as markdown tables.

1. Qwen3-235B-A22B on 8×H200 (NVLink): TP8 vs EP8 decode step times and the crossover
   concurrency, switch time, an RL rollout under TP, EP and the auto policy, memory overhead.
2. Four nodes of 8×H200 over 400 Gb/s InfiniBand: decode step times of an 8-GPU instance
   against EP16/EP32 spanning nodes, and a prefill pool + decode pools run against four
   colocated instances on the same Poisson traffic.
"""

from __future__ import annotations

import time

from moebius.config import ModelConfig, preset
from moebius.engine.policy import AutoPolicy
from moebius.sim.cost_model import CostModel, Link, Profile
from moebius.sim.simulator import CostProfile, SimResult, Simulator
from moebius.sim.workloads import Arrival, poisson, rollout

BATCHES = (1, 8, 32, 64, 128, 192, 256, 384, 512, 1024)


def crossover(cm: CostModel, context: int) -> int | None:
    """Smallest batch (of 8) from which EP's decode step is faster than TP's."""
    for b in range(8, 4097, 8):
        if cm.decode_step_time("ep", b, context) < cm.decode_step_time("tp", b, context):
            return b
    return None


def step_table(cm: CostModel, context: int) -> str:
    rows = ["| batch | TP8 ms | EP8 ms | EP/TP |", "| ---: | ---: | ---: | ---: |"]
    for b in BATCHES:
        tp, ep = (cm.decode_step_time(x, b, context) * 1e3 for x in ("tp", "ep"))
        rows.append(f"| {b} | {tp:.1f} | {ep:.1f} | {ep / tp:.2f} |")
    return "\n".join(rows)


def simulate(
    model: ModelConfig, cm: CostModel, arrivals: list[Arrival], mode: str, **kw
) -> SimResult:
    policy = AutoPolicy(CostProfile(cm)) if mode == "auto" else None
    layout = "tp" if mode == "tp" else "ep"
    return Simulator(model, cm.n, cm, layout=layout, policy=policy, **kw).run(arrivals)


def single_node(profile: Profile, num_prompts: int = 1024, seed: int = 0) -> str:
    m = preset("qwen3-235b-a22b")
    cm = CostModel(m, 8, profile)
    out = [
        "### Qwen3-235B-A22B on 8×H200 (NVLink)",
        "",
        f"Decode step, context 2048 tokens, profile `{profile.name}`:",
        "",
        step_table(cm, 2048),
        "",
    ]
    cross = {c: crossover(cm, c) for c in (512, 1024, 2048, 4096, 8192)}
    out.append(
        "Crossover (smallest batch where EP8 is faster), by context: "
        + ", ".join(f"{c}: {b}" for c, b in cross.items())
        + " (published: 128–256)."
    )
    per_req = (
        m.num_layers * m.kv_planes * m.num_kv_heads * m.head_dim * 2
    )  # KV bytes a token, all heads
    w = cm.switch_time()
    kv = [cm.switch_time(256 * c * per_req * 0.75 / 8) for c in (1024, 4096)]
    out.append(
        f"\nSwitch: weights only {w * 1e3:.0f} ms "
        f"({cm.m.num_layers} layers, 7/8 of the experts change owner); with the KV of 256 "
        f"running requests at 1k–4k tokens {kv[0] * 1e3:.0f}–{kv[1] * 1e3:.0f} ms "
        "(published: 215–434 ms)."
    )
    mem = cm.memory_bytes()
    gb = profile.gpu_memory_bytes
    out.append(
        f"\nMemory per GPU: ours {mem['ours'] / 1e9:.1f} GB of weights; static EP8 "
        f"{mem['static_ep'] / 1e9:.1f} GB (+{(mem['ours'] - mem['static_ep']) / gb:.2%} of "
        f"the GPU: the staging slot); static TP8 {mem['static_tp'] / 1e9:.1f} GB "
        f"(+{(mem['ours'] - mem['static_tp']) / gb:.1%}: whole attention on every rank). "
        "Published: 2.4%."
    )
    arr = rollout(num_prompts, prompt_len=1024, mean_output=2048, max_output=8192, seed=seed)
    out += [
        "",
        f"RL rollout: {num_prompts} prompts of 1024 tokens at t=0, outputs lognormal "
        "(mean 2048, cap 8192), max 1024 running:",
        "",
        "| layout | wall s | output tok/s | switches | TP s | EP s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    res = {}
    for mode in ("tp", "ep", "auto"):
        r = res[mode] = simulate(m, cm, arr, mode)
        out.append(
            f"| {mode} | {r.makespan:.1f} | {r.throughput:.0f} | {len(r.switches)} | "
            f"{r.seconds_by_layout['tp']:.1f} | {r.seconds_by_layout['ep']:.1f} |"
        )
    best = min(res["tp"].makespan, res["ep"].makespan)
    out.append(
        f"\nAuto over the best static layout: {best / res['auto'].makespan:.3f}× "
        "(published: 1.16–1.25×)."
    )
    return "\n".join(out)


def multi_node(profile: Profile, num: int = 1500, rate: float = 12.0, seed: int = 0) -> str:
    m = preset("qwen3-235b-a22b")
    out = [
        "### Four nodes × 8×H200, 400 Gb/s InfiniBand",
        "",
        f"Decode step (context 2048) of one instance; EP16/EP32 run their exchange over "
        f"InfiniBand ({profile.inter_node.bandwidth / 1e9:.0f} GB/s per GPU):",
        "",
        "| batch per instance | TP8 ms | EP8 ms | EP16 ms | EP32 ms |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    cms = {n: CostModel(m, n, profile) for n in (8, 16, 32)}
    for b in (8, 64, 256, 1024, 2048):
        ts = [cms[8].decode_step_time("tp", b, 2048)] + [
            cms[n].decode_step_time("ep", b, 2048) for n in (8, 16, 32)
        ]
        out.append(f"| {b} | " + " | ".join(f"{t * 1e3:.1f}" for t in ts) + " |")
    cm = cms[8]
    arr = poisson(num, rate, prompt_len=2048, mean_output=512, seed=seed)
    # colocated: four auto instances, arrivals dealt round robin
    co = [simulate(m, cm, arr[i::4], "auto") for i in range(4)]
    # disaggregated: one prefill node (TP8, one output token), KV over InfiniBand (8 NICs),
    # three decode nodes (auto) receiving the prompts' KV
    pre = simulate(
        m, cm, [Arrival(a.time, a.prompt_len, 1) for a in arr], "tp", max_num_batched_tokens=16384
    )
    done = sorted(pre.first_token_times.items(), key=lambda kv: kv[1])
    kv_bytes = m.num_layers * m.kv_planes * m.num_kv_heads * m.head_dim * 2
    link = 8 * profile.inter_node.bandwidth
    handoff = [
        Arrival(t + arr[i].prompt_len * kv_bytes / link, arr[i].prompt_len, arr[i].output_len - 1)
        for i, t in ((int(r[1:]), t) for r, t in done)
    ]
    dec = [simulate(m, cm, handoff[i::3], "auto", imported_prefill=True) for i in range(3)]
    out += [
        "",
        f"Poisson traffic, {num} requests at {rate:g}/s, prompts ~2048, outputs ~512:",
        "",
        "| deployment | wall s | output tok/s | TTFT p50 s | TPOT ms | switches |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, runs, ttft in (
        ("4 colocated instances (auto)", co, None),
        ("1 prefill (TP8) + 3 decode (auto)", dec, pre),
    ):
        wall = max(r.makespan for r in runs)
        toks = sum(r.output_tokens for r in runs)
        tt = sorted(ttft.ttft if ttft else [x for r in runs for x in r.ttft])
        tpot = [x for r in runs for x in r.tpot]
        sw = sum(len(r.switches) for r in runs)
        out.append(
            f"| {name} | {wall:.1f} | {toks / wall:.0f} | {tt[len(tt) // 2]:.2f} | "
            f"{1e3 * sum(tpot) / len(tpot):.1f} | {sw} |"
        )
    layouts = [f"{r.seconds_by_layout['ep'] / max(r.makespan, 1e-9):.0%}" for r in dec]
    out.append(f"\nDecode instances' time in EP: {', '.join(layouts)}.")
    return "\n".join(out)


def main(
    profile_path: str = "h200",
    out: str | None = None,
    quick: bool = False,
    nvlink: Link | None = None,
    ib: Link | None = None,
) -> str:
    profile = Profile.load(profile_path)
    if nvlink:
        profile = profile.with_(p2p=nvlink)
    if ib:
        profile = profile.with_(inter_node=ib)
    t0 = time.time()
    text = (
        single_node(profile, 256 if quick else 1024)
        + "\n\n"
        + multi_node(profile, 400 if quick else 1500)
    )
    text += f"\n\n(`moebius sim project`, simulated in {time.time() - t0:.0f} s of CPU time.)\n"
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)
    return text
