"""Run the OpenAI-compatible server: build the engine, wrap it in the FastAPI app and serve it
with uvicorn.

SIGTERM drains: new requests get 503 (and /health turns 503) while in-flight requests finish
within ``grace_seconds``; what is still running then is aborted; the process exits 0. A second
SIGTERM, or SIGINT, falls back to uvicorn's own shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

import uvicorn

from moebius.config import EngineConfig
from moebius.engine.llm_engine import LLMEngine
from moebius.server.api import create_app
from moebius.server.async_engine import AsyncEngine
from moebius.server.tool_parsers import ToolCallConfig

log = logging.getLogger("moebius.server")


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a draining SIGTERM."""

    def __init__(self, config: uvicorn.Config, aengine: AsyncEngine, grace_seconds: float):
        super().__init__(config)
        self.aengine = aengine
        self.grace_seconds = grace_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self._draining and self._loop is not None:
            self._draining = True
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))
            return
        super().handle_exit(sig, frame)

    async def _drain(self) -> None:
        n = self.aengine.num_in_flight
        log.info("SIGTERM: draining %d in-flight requests (grace %.0f s)", n, self.grace_seconds)
        clean = await self.aengine.drain(self.grace_seconds)
        log.info("drained (%s); shutting down", "all finished" if clean else "some aborted")
        self.should_exit = True


def run_server(
    engine_cfg: EngineConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    admin_key: str | None = None,
    served_model_name: str | None = None,
    max_queue: int = 1024,
    grace_seconds: float = 30.0,
    log_level: str = "info",
    engine_class=LLMEngine,
    extend=None,
    describe: str | None = None,
    tool_calls: ToolCallConfig | None = None,
) -> None:
    """Serve ``engine_cfg``'s model until SIGTERM/SIGINT, draining in-flight requests first;
    returns after a clean shutdown. The PD roles pass their ``engine_class`` and ``extend``
    (``extend(app, served_name)`` adds their routes). ``tool_calls``: ``--tool-call-parser``
    and ``--enable-auto-tool-choice``."""
    engine = engine_class(engine_cfg)
    name = served_model_name or engine_cfg.model_dir or "moebius"
    try:
        if engine.tokenizer is not None:  # guided decoding's token bytes (~0.5 s at 152k
            engine.vocabulary()  # tokens) now, not inside the first guided request's step
        app = create_app(engine, name, api_key=api_key, admin_key=admin_key, max_queue=max_queue,
                         tool_calls=tool_calls)
        if extend is not None:
            extend(app, name)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            timeout_graceful_shutdown=5,
            lifespan="on",
        )
        server = DrainingServer(config, app.state.engine, grace_seconds)
        describe = describe or f"{engine_cfg.ranks} ranks, layout {engine_cfg.layout}:"
        log.info("%s serving %r on http://%s:%d", describe, name, host, port)
        server.run()
    finally:
        engine.shutdown()
