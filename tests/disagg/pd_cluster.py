"""Helpers of the disaggregated end-to-end tests: start a router, prefill and decode instances
as separate processes (`python -m moebius.disagg.cli`), wait for them, stop them, and stream
completions through the router."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from moebius.engine.worker import free_port


def start(args: list[str], log_path: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = open(log_path, "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        [sys.executable, "-m", "moebius.disagg.cli", *args], env=env, stdout=log, stderr=log
    )


def wait_healthy(url: str, procs: list, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, f"a process exited early ({p.args})"
        try:
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(url)


def wait_router_sees_all_up(url: str, timeout: float = 30.0) -> None:
    """The router's /health needs one live instance per role; wait for its probes to have
    seen every instance (otherwise a first request may avoid one it still thinks down)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = httpx.get(url + "/router/state", timeout=5.0).json()
        if all(i["up"] for i in state["prefill"] + state["decode"]):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{url}: the router still sees an instance down")


@contextlib.contextmanager
def run_cluster(model_dir: str, router_args: list[str], logs: Path, num_decode: int = 2):
    """A router (``router_args``: policy flags), one prefill and ``num_decode`` decode
    instances of ``model_dir`` on CPU. Yields {url, decode_urls, procs, model, logs}."""
    store, router, pre = free_port(), free_port(), free_port()
    decode_ports = [free_port() for _ in range(num_decode)]
    kv = f"127.0.0.1:{store}"
    url = lambda port: f"http://127.0.0.1:{port}"  # noqa: E731
    engine = ["--device", "cpu", "--max-num-seqs", "8", "--kv-store", kv]
    procs = {
        "router": start(
            ["route", "--prefill", url(pre), "--decode", *map(url, decode_ports)]
            + [*router_args, "--kv-store", kv, "--port", str(router)],
            str(logs / "router.log"),
        )
    }
    time.sleep(0.5)  # the router hosts the store
    roles = [("prefill", pre, "prefill")]
    roles += [(f"d{i + 1}", port, "decode") for i, port in enumerate(decode_ports)]
    for name, port, role in roles:
        procs[name] = start(
            ["serve", model_dir, "--role", role, "--port", str(port), *engine],
            str(logs / f"{name}.log"),
        )
    try:
        for port in (pre, *decode_ports, router):
            wait_healthy(url(port), list(procs.values()))
        wait_router_sees_all_up(url(router))
        yield {
            "url": url(router),
            "decode_urls": [url(p) for p in decode_ports],
            "procs": procs,
            "model": model_dir,
            "logs": logs,
        }
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


def body(model: str, prompt: str, stream: bool, max_tokens: int, **extra) -> dict:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        **extra,
    }


def stream(url: str, req: dict, record: dict, stop=None) -> None:
    """Stream one completion; record chunks seen, text, any error and the decode instance
    (the router's header). Leaves early (a client disconnect) once ``stop`` is set."""
    record.update(chunks=0, text="", error=None, instance=None)
    try:
        with httpx.stream("POST", url + "/v1/completions", json=req, timeout=120) as r:
            record["instance"] = r.headers.get("x-moebius-decode-instance")
            if r.status_code != 200:
                record["error"] = f"{r.status_code}: {r.read()!r}"
                return
            for line in r.iter_lines():
                if stop is not None and stop.is_set():
                    return
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    record["error"] = event["error"]["message"]
                    return
                record["chunks"] += 1
                record["text"] += event["choices"][0]["text"]
    except httpx.HTTPError as e:
        record["error"] = repr(e)
