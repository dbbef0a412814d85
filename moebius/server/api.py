"""The FastAPI app: OpenAI's /v1/completions, /v1/chat/completions (JSON or server-sent events),
/v1/models and /v1/models/{id}, vLLM's /tokenize and /detokenize, plus /health, /version,
/metrics and the admin endpoints /admin/layout, /admin/switch and /admin/update_weights.

Every error is OpenAI's error JSON. Bad input is a 400 (404 for an unknown model, as OpenAI
and vLLM answer), a bad key a 401, a full queue a 429 and a draining or failed server a 503,
both with Retry-After. Bodies are parsed by hand (not by FastAPI's signature binding) so that
malformed JSON, wrong types and missing fields all take the same 400 path.
"""

from __future__ import annotations

import hmac
import json
import logging
from contextlib import asynccontextmanager
from dataclasses import asdict

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import moebius
from moebius.server import protocol as P
from moebius.server import tokenization
from moebius.server.async_engine import (
    AsyncEngine,
    EngineDeadError,
    EngineUnavailableError,
    QueueFullError,
)
from moebius.server.metrics import ServerMetrics
from moebius.server.responses import Responder
from moebius.server.tool_parsers import ToolCallConfig

log = logging.getLogger("moebius.server")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers


def check_served(name: str | None, served: str) -> None:
    """404 (OpenAI's ``model_not_found``, param ``model``) for another model than ``served``;
    None (a field left out) is fine."""
    if name is not None and name != served:
        raise APIError(
            404, f"The model `{name}` does not exist.", param="model", code="model_not_found"
        )


def error_json(
    status: int,
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict | None = None,
) -> JSONResponse:
    body = P.ErrorResponse(
        error=P.ErrorInfo(
            message=message, type=type, param=param, code=code if code is not None else status
        )
    )
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def to_api_error(e: BaseException) -> APIError:
    """Map an exception raised while serving a request onto its HTTP error."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFullError):
        return APIError(429, str(e), "rate_limit_error", headers={"Retry-After": "1"})
    if isinstance(e, EngineUnavailableError):
        return APIError(503, str(e), "service_unavailable", headers={"Retry-After": "5"})
    if isinstance(e, pydantic.ValidationError):
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "json_invalid":
            return APIError(400, f"the body is not valid JSON: {err['msg']}")
        return APIError(400, f"{loc or 'body'}: {err['msg']}", param=loc or None)
    # SamplingError, PromptTooLongError, chat template errors (chat_template.render)
    if isinstance(e, ValueError):
        return APIError(400, str(e))
    return APIError(500, f"internal error: {type(e).__name__}: {e}", "internal_server_error")


def error_response(e: BaseException, logger: logging.Logger = log,
                   what: str = "request failed") -> JSONResponse:
    """OpenAI's error JSON for ``e`` (``to_api_error``); an internal error (500) is logged
    with its traceback as ``what``."""
    err = to_api_error(e)
    if err.status == 500:
        logger.exception(what)
    return error_json(err.status, err.message, err.type, err.param, err.code, err.headers)


def create_app(
    engine,
    served_model_name: str,
    api_key: str | None = None,
    admin_key: str | None = None,
    max_queue: int = 1024,
    owns_engine: bool = True,
    tool_calls: ToolCallConfig | None = None,
) -> FastAPI:
    """The app around a started ``LLMEngine``. Its lifespan starts the engine thread and, on
    shutdown, stops it (and the engine's workers when ``owns_engine``). ``tool_calls``: the
    tool-call flags (default: none, so requests with tools answer 400 unless tool_choice is
    "none")."""
    metrics = ServerMetrics(served_model_name, engine.cfg.context_len)
    aengine = AsyncEngine(engine, max_queue=max_queue, metrics=metrics)
    responder = Responder(aengine, served_model_name, tool_calls)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        aengine.start()
        yield
        if owns_engine:
            await aengine.shutdown()

    app = FastAPI(title="moebius", version=moebius.__version__, lifespan=lifespan)
    app.state.engine = aengine
    app.state.metrics = metrics
    app.state.responder = responder

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_json(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error_json(e.status_code, str(e.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_json(500, f"internal error: {type(e).__name__}", "internal_server_error")

    def check_key(request: Request, key: str | None, what: str) -> None:
        if key is None:
            return
        auth = request.headers.get("authorization", "")
        given = (
            auth[7:]
            if auth.lower().startswith("bearer ")
            else request.headers.get("x-api-key" if what == "API" else "x-admin-key", "")
        )
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise APIError(401, f"invalid or missing {what} key", code="invalid_api_key")

    async def parse(request: Request, model):
        """The body as ``model`` (a pydantic class, or a function of the raw body choosing
        one); 400 for a bad body, 404 for an unknown model."""
        check_key(request, api_key, "API")
        body = await request.body()
        if not isinstance(model, type):
            model = model(body)
        try:
            req = model.model_validate_json(body)
        except pydantic.ValidationError as e:
            raise to_api_error(e) from None
        check_served(req.model, served_model_name)
        return req

    async def serve(kind: str, request: Request) -> Response:
        try:
            if kind == "chat":
                req = await parse(request, P.ChatCompletionRequest)
                job = responder.prepare_chat(req)
            else:
                req = await parse(request, P.CompletionRequest)
                job = responder.prepare_completion(req)
            aengine.check_admission()
            if req.stream:
                return StreamingResponse(
                    responder.stream(job),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache"},
                )
            return JSONResponse(await responder.collect(job))
        except Exception as e:
            return error_response(e)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serve("completion", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serve("chat", request)

    def model_card() -> P.ModelCard:
        return P.ModelCard(
            id=served_model_name, root=engine.cfg.model_dir, max_model_len=engine.cfg.context_len
        )

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request, api_key, "API")
        return P.ModelList(data=[model_card()]).model_dump()

    @app.get("/v1/models/{model_id:path}")  # :path: served names may hold "/" (org/name)
    async def retrieve_model(request: Request, model_id: str):
        check_key(request, api_key, "API")
        check_served(model_id, served_model_name)
        return model_card().model_dump()

    async def answer(request: Request, model, handle) -> Response:
        try:
            return JSONResponse(handle(responder, await parse(request, model)).model_dump())
        except Exception as e:
            return error_response(e)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        return await answer(request, P.tokenize_request_type, tokenization.tokenize)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        return await answer(request, P.DetokenizeRequest, tokenization.detokenize)

    @app.get("/health")
    async def health():
        if aengine.error is not None:
            return JSONResponse({"status": "unhealthy", "error": aengine.error}, 503)
        if aengine.draining or not aengine.healthy:
            return JSONResponse({"status": "draining"}, 503, headers={"Retry-After": "5"})
        return {"status": "ok"}

    @app.get("/version")
    async def version():
        return {"version": moebius.__version__}

    @app.get("/metrics")
    async def metrics_endpoint():
        return Response(metrics.render(), media_type=metrics.content_type)

    def check_admin(request: Request) -> None:
        if admin_key is None:
            raise APIError(
                403,
                "admin endpoints are disabled: start the server with --admin-key",
                "permission_error",
            )
        check_key(request, admin_key, "admin")

    @app.get("/admin/layout")
    async def admin_layout(request: Request):
        check_admin(request)
        return {
            "layout": engine.layout,
            "ranks": engine.cfg.ranks,
            "stats": engine.stats(),
            "switches": [asdict(r) for r in engine.switches],
        }

    async def admin_action(request: Request, model, act, late: str):
        """An admin POST: the body read as ``model``, then ``act(body)`` awaited; bad bodies
        and refusals as the API's errors, a timeout as a 504 saying ``late``."""
        check_admin(request)
        try:
            return await act(model.model_validate_json(await request.body()))
        except (pydantic.ValidationError, ValueError, EngineDeadError) as e:
            raise to_api_error(e) from None
        except TimeoutError:
            raise APIError(504, late, "timeout") from None

    @app.post("/admin/switch")
    async def admin_switch(request: Request):
        record = await admin_action(request, P.SwitchRequest,
                                    lambda req: aengine.switch(req.layout),
                                    "the switch did not happen in time")
        return {
            "layout": engine.layout,
            "switched": record is not None,
            "switch": asdict(record) if record is not None else None,
        }

    @app.post("/admin/update_weights")
    async def admin_update_weights(request: Request):
        """New weights of the served model from a checkpoint folder, once the running
        requests finish (moebius/engine/weight_update.py)."""
        record = await admin_action(
            request, P.UpdateWeightsRequest, lambda req: aengine.update_weights(req.model_path),
            "the running requests did not finish in time for the weight update; it stays queued")
        return {"success": True, "weights_version": record.version, "update": asdict(record)}

    return app


def sse(data) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"
