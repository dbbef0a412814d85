"""``moebius bench`` end to end on CPU (2 gloo ranks, tiny checkpoint): every mode serves the
whole workload, each layout is warmed up before any timed run, the JSON has what the plots
read."""

from __future__ import annotations

import argparse

from moebius.bench import harness


def test_rollout_all_modes(qwen_dir, tmp_path):
    p = argparse.ArgumentParser()
    harness.add_args(p)
    args = p.parse_args([
        "--model-dir", qwen_dir, "--ranks", "2", "--device", "cpu", "--workload", "rollout",
        "--num-prompts", "12", "--prompt-mean", "16", "--output-mean", "6", "--output-cap", "12",
        "--profile-batches", "1", "4", "16", "--profile-steps", "2", "--warmup-prompts", "4",
        "--profile-cache", str(tmp_path / "profiles"), "--out", str(tmp_path / "bench.json"),
    ])
    out = harness.run(args)
    assert set(out["warm_up_seconds"]) == {"tp", "ep"}
    wanted = sum(s.output_len for s in harness.make_workload(args).iterations[0])
    for mode in ("tp", "ep", "auto"):
        run = out["runs"][mode]
        assert len(run["requests"]) == 12
        assert run["output_tokens"] == wanted
        assert set(run["steps"]) >= {"t", "seconds", "batch", "layout", "tokens"}
    assert {lay for lay in out["runs"]["tp"]["steps"]["layout"]} == {"tp"}
    assert {lay for lay in out["runs"]["ep"]["steps"]["layout"]} == {"ep"}
