"""OpenAI-compatible HTTP serving: the asyncio engine front, the FastAPI app, Prometheus
metrics and the uvicorn runner (``run_server``)."""

from moebius.server.serve import run_server

__all__ = ["run_server"]
