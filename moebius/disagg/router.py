"""The prefill/decode router: an OpenAI-compatible front for prefill and decode instances.

For each `/v1/completions` or `/v1/chat/completions` request: a prefill instance (round robin
over the live ones) runs the prompt and returns its expert counts (`POST /internal/prefill`);
the routing policy (moebius.disagg.eldr: eldr, least_load, round_robin, random) picks a decode
instance from the counts and the in-flight decode requests per instance; the decode instance
pulls the KV from the prefill instance and answers in OpenAI's format, which the router relays
(streamed as it comes).

Failures: an instance that refuses connections or drops one is marked down (a health probe
every `health_interval` seconds brings it back). Until the decode instance has sent its first
bytes nothing has reached the client, so the router starts the request again (prefill
included) elsewhere: no request is lost before its first token. After that, a stream ends with
an OpenAI error event and `data: [DONE]`. Requests the policy would send to a dead instance go
to the least loaded live one.

Every decoded response carries the chosen decode instance's URL in the
`x-moebius-decode-instance` header.

Metrics (Prometheus, `/metrics`): `moebius:router_requests_total{outcome}`,
`moebius:router_retries_total{stage}`, `moebius:router_decode_in_flight{instance}`,
`moebius:router_routed_total{instance}`, `moebius:router_instance_up{role,instance}`,
`moebius:router_prefill_seconds`, `moebius:router_time_to_first_byte_seconds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from moebius.disagg.eldr import RoutingPolicy

log = logging.getLogger("moebius.router")
DECODE_INSTANCE_HEADER = "x-moebius-decode-instance"  # on every decoded response: which one


@dataclass
class Instance:
    url: str
    role: str
    up: bool = True
    in_flight: int = 0  # decode requests relayed right now


def _error(status: int, message: str, type_: str = "service_unavailable") -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": None, "code": status}}
    return JSONResponse(body, status, headers={"Retry-After": "1"} if status == 503 else None)


class _Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "moebius:router_requests", "Requests by outcome.", ["outcome"], registry=r
        )
        self.retries = Counter(
            "moebius:router_retries", "Attempts restarted elsewhere.", ["stage"], registry=r
        )
        self.in_flight = Gauge(
            "moebius:router_decode_in_flight", "In-flight decodes.", ["instance"], registry=r
        )
        self.routed = Counter(
            "moebius:router_routed",
            "Requests routed per decode instance.",
            ["instance"],
            registry=r,
        )
        self.up = Gauge("moebius:router_instance_up", "1 if up.", ["role", "instance"], registry=r)
        self.prefill = Histogram("moebius:router_prefill_seconds", "Prefill call.", registry=r)
        self.ttfb = Histogram(
            "moebius:router_time_to_first_byte_seconds", "Arrival to first byte.", registry=r
        )


class _Retry(Exception):
    """This attempt failed before anything reached the client."""


def create_router_app(
    prefill_urls: list[str],
    decode_urls: list[str],
    policy: RoutingPolicy,
    *,
    health_interval: float = 1.0,
    timeout_s: float = 600.0,
    kv_store=None,
) -> FastAPI:
    """The router app. ``kv_store`` (a TCPStore it hosts, if any) is kept alive with it."""
    prefills = [Instance(u.rstrip("/"), "prefill") for u in prefill_urls]
    decodes = [Instance(u.rstrip("/"), "decode") for u in decode_urls]
    metrics = _Metrics()
    max_attempts = len(prefills) + len(decodes) + 1
    client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=5.0))
    cursor = {"prefill": 0}

    def mark(inst: Instance, up: bool) -> None:
        if inst.up != up:
            log.warning("%s instance %s is %s", inst.role, inst.url, "up" if up else "down")
        inst.up = up
        metrics.up.labels(inst.role, inst.url).set(1 if up else 0)

    async def probe_loop() -> None:
        while True:
            for inst in prefills + decodes:
                try:
                    r = await client.get(inst.url + "/health", timeout=2.0)
                    mark(inst, r.status_code == 200)
                except httpx.HTTPError:
                    mark(inst, False)
            await asyncio.sleep(health_interval)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for inst in prefills + decodes:
            mark(inst, True)
        task = asyncio.create_task(probe_loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.aclose()

    app = FastAPI(title="moebius router", lifespan=lifespan)
    app.state.prefills, app.state.decodes, app.state.kv_store = prefills, decodes, kv_store

    def pick_prefill() -> Instance | None:
        live = [p for p in prefills if p.up]
        if not live:
            return None
        cursor["prefill"] += 1
        return live[cursor["prefill"] % len(live)]

    def pick_decode(counts) -> Instance | None:
        live = [i for i, d in enumerate(decodes) if d.up]
        if not live:
            return None
        loads = [d.in_flight if d.up else 1 << 30 for d in decodes]
        request = None if counts is None else np.asarray(counts, dtype=np.float64)
        try:
            k = policy.choose(request, loads)
        except (ValueError, TypeError) as e:  # e.g. eldr without counts
            log.warning("policy %s failed (%s); least load instead", policy.name, e)
            k = live[0]
        if not decodes[k].up:
            k = min(live, key=lambda i: (loads[i], i))
        return decodes[k]

    async def prefill_once(
        kind: str, body: dict, headers: dict
    ) -> tuple[Instance, dict] | Response:
        inst = pick_prefill()
        if inst is None:
            return _error(503, "no prefill instance is up")
        t0 = time.perf_counter()
        try:
            r = await client.post(
                inst.url + "/internal/prefill", json={"kind": kind, "body": body}, headers=headers
            )
        except httpx.HTTPError as e:
            mark(inst, False)
            metrics.retries.labels("prefill").inc()
            raise _Retry(f"prefill {inst.url}: {e}") from e
        metrics.prefill.observe(time.perf_counter() - t0)
        if r.status_code == 503:
            metrics.retries.labels("prefill").inc()
            raise _Retry(f"prefill {inst.url} unavailable")
        if r.status_code != 200:
            return Response(r.content, r.status_code, media_type="application/json")
        return inst, r.json()

    async def decode_once(kind, body, headers, pre: Instance, h: dict, t_arrival: float):
        inst = pick_decode(h.get("expert_counts"))
        if inst is None:
            return _error(503, "no decode instance is up")
        handoff = {k: h[k] for k in ("handoff_id", "prefill", "tag")} | {"prefill_url": pre.url}
        payload = {"kind": kind, "body": body, "handoff": handoff}
        inst.in_flight += 1
        metrics.in_flight.labels(inst.url).set(inst.in_flight)
        metrics.routed.labels(inst.url).inc()
        resp = None

        def release() -> None:
            inst.in_flight -= 1
            metrics.in_flight.labels(inst.url).set(inst.in_flight)

        try:
            req = client.build_request(
                "POST", inst.url + "/internal/decode", json=payload, headers=headers
            )
            resp = await client.send(req, stream=True)
            if resp.status_code >= 500:
                text = await resp.aread()
                raise _Retry(f"decode {inst.url} answered {resp.status_code}: {text[:200]!r}")
            chunks = resp.aiter_raw()
            first = await anext(chunks, b"")
        except (httpx.HTTPError, _Retry) as e:
            release()
            if resp is not None:
                await resp.aclose()
            if isinstance(e, httpx.HTTPError):
                mark(inst, False)
            metrics.retries.labels("decode").inc()
            raise _Retry(str(e)) from e
        metrics.ttfb.observe(time.monotonic() - t_arrival)

        async def relay():
            ok = True
            try:
                yield first
                async for chunk in chunks:
                    yield chunk
            except httpx.HTTPError as e:
                ok = False
                mark(inst, False)
                log.warning("decode %s failed mid-stream: %s", inst.url, e)
                if resp.headers.get("content-type", "").startswith("text/event-stream"):
                    msg = f"the decode instance failed after the first token: {e}"
                    err = {"error": {"message": msg, "type": "service_unavailable", "code": 503}}
                    yield f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()
            finally:
                release()
                metrics.requests.labels("ok" if ok and resp.status_code == 200 else "failed").inc()
                await resp.aclose()

        media = resp.headers.get("content-type", "application/json")
        headers = {DECODE_INSTANCE_HEADER: inst.url}
        return StreamingResponse(relay(), resp.status_code, headers=headers, media_type=media)

    async def handle(kind: str, request: Request) -> Response:
        t_arrival = time.monotonic()
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            metrics.requests.labels("client_error").inc()
            return _error(400, "the body must be a JSON object", "invalid_request_error")
        headers = {
            k: v for k, v in request.headers.items() if k.lower() in ("authorization", "x-api-key")
        }
        last = "no attempt"
        for _ in range(max_attempts):
            try:
                got = await prefill_once(kind, body, headers)
                if isinstance(got, Response):
                    metrics.requests.labels(
                        "client_error" if got.status_code < 500 else "failed"
                    ).inc()
                    return got
                pre, h = got
                return await decode_once(kind, body, headers, pre, h, t_arrival)
            except _Retry as e:
                last = str(e)
                log.info("retrying elsewhere: %s", e)
        metrics.requests.labels("failed").inc()
        return _error(503, f"no instance could serve the request (last: {last})")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle("completion", request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await handle("chat", request)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        for inst in [p for p in prefills if p.up]:
            try:
                r = await client.get(inst.url + "/v1/models", headers=dict(request.headers))
                return Response(r.content, r.status_code, media_type="application/json")
            except httpx.HTTPError:
                mark(inst, False)
        return _error(503, "no prefill instance is up")

    @app.get("/health")
    async def health():
        ok = any(p.up for p in prefills) and any(d.up for d in decodes)
        return JSONResponse({"status": "ok" if ok else "unhealthy"}, 200 if ok else 503)

    @app.get("/router/state")
    async def state():
        return {
            "policy": policy.name,
            "prefill": [vars(p) for p in prefills],
            "decode": [vars(d) for d in decodes],
        }

    @app.get("/metrics")
    async def metrics_endpoint():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
