"""Launching ranks: torchrun runs the same command; a dead worker stops the engine clearly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from moebius import LLM, SamplingParams
from moebius.engine.worker import WorkerError, free_port

ARGS = ["--prompt", "Hello, world!", "--prompt", "def add(a, b):", "--max-tokens", "8", "--json"]


def _generate(cmd: list[str]) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_torchrun_runs_the_same_command(qwen_dir):
    single = _generate([sys.executable, "-m", "moebius.cli", "generate", qwen_dir, *ARGS])
    launched = _generate([
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(free_port()), "-m", "moebius.cli", "generate", qwen_dir,
        "--ranks", "2", "--layout", "ep", "--switch-schedule", "2:tp,5:ep", *ARGS,
    ])
    assert [r["token_ids"] for r in launched] == [r["token_ids"] for r in single]
    assert len(single) == 2


def test_dead_worker_stops_the_engine_with_a_clear_error(qwen_dir):
    llm = LLM(qwen_dir, ranks=2)
    try:
        sp = SamplingParams(temperature=0, max_tokens=4)
        llm.generate("Hello", sp)
        victim = llm.engine.executor.procs[1]
        os.kill(victim.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match="rank 1"):
            llm.generate("Hello again", sp)
        assert time.monotonic() - t0 < 30
        assert not llm.engine.executor.procs  # the others were stopped too
    finally:
        llm.shutdown()
