"""The HTTP side of a prefill or decode instance: the usual OpenAI server plus internal
handoff endpoints, and `run_role_server` to start one.

A request's handoff, driven by the router (moebius/disagg/router.py):
  1. router -> prefill `POST /internal/prefill {kind, body}`: the prefill instance validates
     the OpenAI body as its server would, runs the prompt to its first token and keeps the
     exported KV; it answers `{handoff_id, prefill, tag, expert_counts, ...}`.
  2. the router picks a decode instance (its policy sees the expert counts).
  3. router -> decode `POST /internal/decode {kind, body, handoff: {handoff_id, prefill,
     prefill_url, tag}}`: the decode instance asks the prefill instance to push the KV
     (`POST /internal/kv/send {handoff_id, peer}`) while it receives it through the
     `KVTransport`, then serves the body exactly as its OpenAI endpoint would (JSON or SSE),
     continuing from the handed-off first token.
Exports not pulled within `EXPORT_TTL_S` are dropped. The internal endpoints carry no key of
their own: keep instances on loopback or a private network, behind the router.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from contextlib import aclosing
from dataclasses import replace

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from moebius.config import EngineConfig
from moebius.disagg.kv_transfer import KVTransport, TorchDistTransport, endpoint_name
from moebius.disagg.roles import DecodeEngine, PrefillEngine
from moebius.server import protocol as P
from moebius.server.api import APIError, check_served, error_json, error_response
from moebius.server.responses import Responder
from moebius.server.serve import run_server

log = logging.getLogger("moebius.disagg")
EXPORT_TTL_S = 120.0


def _parse(responder: Responder, kind: str, body: dict, served_name: str):
    model = P.ChatCompletionRequest if kind == "chat" else P.CompletionRequest
    req = model.model_validate_json(json.dumps(body))
    check_served(req.model, served_name)
    job = responder.prepare_chat(req) if kind == "chat" else responder.prepare_completion(req)
    if len(job.prompts) != 1 or job.params[0].n != 1:
        raise APIError(400, "disaggregated serving takes one prompt and n = 1 per request")
    return req, job


def _error(e: BaseException) -> JSONResponse:
    return error_response(e, log, "handoff failed")


def add_handoff_routes(app: FastAPI, role: str, transport: KVTransport, served_name: str) -> None:
    """Add `/internal/*` for ``role`` to an app made by `moebius.server.api.create_app`."""
    aengine = app.state.engine
    engine = aengine.engine
    responder: Responder = app.state.responder  # the OpenAI routes' (tool-call flags too)
    exports: dict[str, tuple[object, int, float]] = {}  # handoff id -> (payload, tag, time)
    tags = itertools.count(1)
    peer_locks: dict[str, asyncio.Lock] = {}
    client = httpx.AsyncClient(timeout=httpx.Timeout(60.0))

    async def read(request: Request) -> dict:
        data = json.loads(await request.body())
        if not isinstance(data, dict) or data.get("kind") not in ("completion", "chat"):
            raise APIError(400, "expected {kind: completion|chat, body: {...}}")
        return data

    @app.get("/internal/info")
    async def info():
        return {"role": role, "name": transport.name, "model": served_name}

    if role == "prefill":

        @app.post("/internal/prefill")
        async def prefill(request: Request) -> Response:
            try:
                data = await read(request)
                _, job = _parse(responder, data["kind"], data["body"], served_name)
                aengine.check_admission()
                now = time.monotonic()
                for hid in [h for h, (_, _, t) in exports.items() if now - t > EXPORT_TTL_S]:
                    exports.pop(hid, None)
                gen = aengine.generate(job.prompts[0], job.params[0], job.id)
                async with aclosing(gen) as outs:
                    async for out in outs:
                        if out.finished:
                            break
                payload = engine.exports.pop(job.id, None)
                if payload is None:
                    raise APIError(503, "the prefill did not complete", "service_unavailable")
                tag = next(tags)
                exports[job.id] = (payload, tag, time.monotonic())
                return JSONResponse(
                    {
                        "handoff_id": job.id,
                        "prefill": transport.name,
                        "tag": tag,
                        "num_prompt_tokens": len(payload.meta["prompt_token_ids"]),
                        "first_token": payload.meta["first_token"],
                        "expert_counts": payload.meta["expert_counts"],
                    }
                )
            except Exception as e:
                return _error(e)

        @app.post("/internal/kv/send")
        async def kv_send(request: Request) -> Response:
            data = json.loads(await request.body())
            entry = exports.pop(data.get("handoff_id"), None)
            if entry is None:
                return error_json(404, "unknown or expired handoff id", code="handoff_not_found")
            payload, tag, _ = entry
            try:
                await asyncio.to_thread(transport.send, data["peer"], payload, tag)
            except Exception as e:
                return error_json(502, f"KV transfer failed: {e}", "transfer_error")
            return JSONResponse(
                {"sent": True, "bytes": payload.kv.numel() * payload.kv.element_size()}
            )

    if role == "decode":

        @app.post("/internal/decode")
        async def decode(request: Request) -> Response:
            try:
                data = await read(request)
                req, job = _parse(responder, data["kind"], data["body"], served_name)
                h = data["handoff"]
                job = replace(job, id=h["handoff_id"])
                rid = f"{job.id}-0"  # the engine request id Responder gives prompt 0
                aengine.check_admission()
                peer = h["prefill"]
                lock = peer_locks.setdefault(peer, asyncio.Lock())
                async with lock:  # one transfer per pair in flight (NCCL ignores tags)
                    recv = asyncio.ensure_future(
                        asyncio.to_thread(transport.recv, peer, int(h["tag"]))
                    )
                    resp = await client.post(
                        h["prefill_url"].rstrip("/") + "/internal/kv/send",
                        json={"handoff_id": h["handoff_id"], "peer": transport.name},
                    )
                    if resp.status_code != 200:
                        recv.cancel()  # the thread ends at the transport's timeout
                        raise APIError(502, f"the prefill instance refused: {resp.text}")
                    payload = await recv
                if payload.meta["prompt_token_ids"] != job.prompts[0]:
                    raise APIError(500, "the handed-off prompt differs from this request's")
                engine.expect(rid, payload)
                if req.stream:
                    return StreamingResponse(
                        responder.stream(job),
                        media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache"},
                    )
                try:
                    return JSONResponse(await responder.collect(job))
                finally:
                    engine.forget(rid)
            except Exception as e:
                return _error(e)


def run_role_server(cfg: EngineConfig, role: str, kv_store: str, port: int = 8000,
                    **server_kw) -> None:
    """Serve one prefill or decode instance until SIGTERM/SIGINT: `run_server` with the
    role's engine and its handoff routes, over a KV transport opened for the instance."""
    if role not in ("prefill", "decode"):
        raise ValueError(f"role must be prefill or decode, got {role!r}")
    transport = TorchDistTransport(endpoint_name(role, port), kv_store, device=cfg.device)
    try:
        run_server(
            cfg,
            port=port,
            engine_class=PrefillEngine if role == "prefill" else DecodeEngine,
            extend=lambda app, name: add_handoff_routes(app, role, transport, name),
            describe=f"{role} instance {transport.name}",
            **server_kw,
        )
    finally:
        transport.close()
