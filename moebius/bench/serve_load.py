"""A serving load generator in the manner of vLLM's ``benchmark_serving``: streams completions
from any OpenAI-compatible server at a Poisson request rate (or all at once), and reports
request throughput, output token throughput, and TTFT / ITL / E2E percentiles.

    python -m moebius.bench.serve_load --base-url http://127.0.0.1:8000/v1 --model tiny \\
        --num-requests 200 --request-rate 20 --max-tokens 32 --out results/serve_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx
import numpy as np

WORDS = (
    "the model serves many users at once while experts route every token to a few of "
    "many feed forward blocks and the cache keeps keys and values of earlier tokens"
).split()


@dataclass
class RequestRecord:
    ok: bool = False
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""


async def one_request(client: httpx.AsyncClient, url: str, body: dict, headers: dict):
    rec = RequestRecord()
    t0 = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    rec.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()
                if last is None:
                    rec.ttft = now - t0
                else:
                    rec.itl.append(now - last)
                last = now
        rec.e2e = time.perf_counter() - t0
        rec.ok = True
    except httpx.HTTPError as e:
        rec.error = repr(e)
    return rec


def _pcts(values: list[float]) -> dict:
    if not values:
        return {}
    a = np.asarray(values) * 1e3
    return {
        "mean_ms": float(a.mean()),
        "p50_ms": float(np.percentile(a, 50)),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
    }


async def run(
    base_url: str,
    model: str,
    num_requests: int,
    request_rate: float,
    prompt_words: int,
    max_tokens: int,
    api_key: str | None,
    seed: int,
) -> dict:
    rng = random.Random(seed)
    url = base_url.rstrip("/") + "/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=num_requests)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        tasks = []
        t0 = time.perf_counter()
        for _ in range(num_requests):
            prompt = " ".join(rng.choice(WORDS) for _ in range(prompt_words))
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "stream": True,
                "temperature": 0,
                "ignore_eos": True,
                "stream_options": {"include_usage": True},
            }
            tasks.append(asyncio.create_task(one_request(client, url, body, headers)))
            if request_rate > 0:
                await asyncio.sleep(rng.expovariate(request_rate))
        records = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "num_requests": num_requests,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "duration_s": wall,
        "request_rate": request_rate,
        "request_throughput": len(ok) / wall,
        "output_token_throughput": out_tokens / wall,
        "ttft": _pcts([r.ttft for r in ok]),
        "itl": _pcts([x for r in ok for x in r.itl]),
        "e2e": _pcts([r.e2e for r in ok]),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", required=True)
    ap.add_argument("--num-requests", type=int, default=100)
    ap.add_argument("--request-rate", type=float, default=0.0, help="req/s, 0: all at once")
    ap.add_argument("--prompt-words", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = asyncio.run(
        run(
            args.base_url,
            args.model,
            args.num_requests,
            args.request_rate,
            args.prompt_words,
            args.max_tokens,
            args.api_key,
            args.seed,
        )
    )
    print(json.dumps(res, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
