"""The OpenAI-compatible HTTP server: the FastAPI app, its lifecycle, and `run_server`.

The endpoints live one module each, as vLLM splits them: serving_completion.py and
serving_chat.py, on what they share in serving.py; errors.py is the one error path. Here: the
request-id middleware and access log, the probes (/health, /ready), /metrics, /v1/models and the
runtime LoRA endpoints (serving_models.py), and uvicorn with a draining shutdown.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import structlog
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvpilot_engine.config import EngineArgs
from kvpilot_engine.llm_engine import LLMEngine
from kvpilot_engine.lora.request import LoRARequest
from kvpilot_engine.server.async_engine import AsyncLLMEngine
from kvpilot_engine.server.errors import add_exception_handlers, error_response
from kvpilot_engine.server.guard import ApiKeyMiddleware, GuardSettings
from kvpilot_engine.server.http import h11_with_header_timeout
from kvpilot_engine.server.logs import configure_logging
from kvpilot_engine.server.metrics import ServerMetrics
from kvpilot_engine.server.protocol import (
    LoadLoRAAdapterRequest,
    ModelList,
    UnloadLoRAAdapterRequest,
)
from kvpilot_engine.server.serving_chat import OpenAIServingChat
from kvpilot_engine.server.serving_completion import OpenAIServingCompletion
from kvpilot_engine.server.serving_models import OpenAIServingModels
from kvpilot_engine.server.tools import ToolSettings

log = structlog.get_logger("kvpilot.server")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


# ---- request id and access log (plain ASGI, so streaming and disconnects pass untouched) ------
class RequestIdMiddleware:
    def __init__(self, app: Callable[..., Awaitable[None]]):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _REQUEST_ID_RE.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        status = 500
        t0 = time.perf_counter()

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=rid):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                if scope["path"] not in ("/metrics", "/health", "/ready"):
                    log.info(
                        "http_request",
                        method=scope["method"],
                        path=scope["path"],
                        status=status,
                        duration_ms=round((time.perf_counter() - t0) * 1000, 1),
                    )


# ---- the app -----------------------------------------------------------------------------------
def build_app(
    engine: AsyncLLMEngine,
    served_model_name: str,
    metrics: ServerMetrics,
    guard: GuardSettings | None = None,
    tools: ToolSettings | None = None,
    models: OpenAIServingModels | None = None,
) -> FastAPI:
    guard = guard or GuardSettings()
    models = models or OpenAIServingModels(engine, served_model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="kvpilot", lifespan=lifespan, docs_url=None, redoc_url=None)
    if guard.api_key:
        # Added first, so it runs inside RequestIdMiddleware: a 401 is logged with its id too.
        app.add_middleware(ApiKeyMiddleware, api_key=guard.api_key)
    app.add_middleware(RequestIdMiddleware)
    add_exception_handlers(app)
    completion = OpenAIServingCompletion(engine, served_model_name, metrics, guard, models)
    chat = OpenAIServingChat(engine, served_model_name, metrics, guard, models, tools)

    @app.get("/health")
    async def health() -> Response:
        if not engine.alive:
            return error_response(503, "the engine has failed", code="unavailable")
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        if not engine.ready:
            return error_response(503, "the model is still loading", code="unavailable")
        if engine.draining:
            return error_response(503, "the server is shutting down", code="unavailable")
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return models.show_available_models()

    # vLLM's runtime LoRA endpoints; they answer 404 unless runtime updating is allowed.
    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        req = await completion.parse(request, LoadLoRAAdapterRequest)
        await models.load_lora_adapter(req.lora_name, req.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        req = await completion.parse(request, UnloadLoRAAdapterRequest)
        await models.unload_lora_adapter(req.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await completion.create_completion(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await chat.create_chat_completion(request)

    return app


# ---- logging and serving -----------------------------------------------------------------------
class _DrainingServer(uvicorn.Server):
    """uvicorn, but SIGTERM/SIGINT first drains: new requests get 503 and /ready fails while
    in-flight requests finish (up to the drain timeout); only then does uvicorn shut down.
    A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, engine: AsyncLLMEngine, drain_timeout: float):
        super().__init__(config)
        self._engine = engine
        self._drain_timeout = drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Future[None] | None = None

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Deliberately not uvicorn's: it re-raises the signal after shutdown, which would make
        # the process die of SIGTERM instead of exiting 0 after a clean drain.
        if self._loop is None or self._drain_task is not None or self.should_exit:
            self.force_exit = self.should_exit
            self.should_exit = True
            return
        log.info("draining", signal=signal.Signals(sig).name, timeout_s=self._drain_timeout)
        self._drain_task = asyncio.Future()  # a placeholder until the loop picks it up
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        await self._engine.drain(self._drain_timeout)
        log.info("drained; shutting down")
        self.should_exit = True

    def stop(self, error: BaseException) -> None:
        self.should_exit = True


def run_server(
    engine_args: EngineArgs,
    *,
    host: str,
    port: int,
    served_model_name: str,
    max_waiting: int,
    drain_timeout: float,
    log_level: str = "info",
    inject_step_delay: float = 0.0,
    guard: GuardSettings | None = None,
    tools: ToolSettings | None = None,
    lora_modules: list[LoRARequest] | None = None,
    lora_sources: dict[str, str] | None = None,
    allow_runtime_lora_updating: bool = False,
) -> int:
    """Serve until stopped. `lora_modules`: adapters (already local) added before the server is
    ready; `lora_sources`: what each was given as (the URI), for /v1/models."""
    guard = guard or GuardSettings()
    configure_logging(log_level)
    metrics = ServerMetrics(served_model_name)
    engine = AsyncLLMEngine(
        lambda: LLMEngine(engine_args), metrics, max_waiting, inject_step_delay, lora_modules
    )
    models = OpenAIServingModels(
        engine,
        served_model_name,
        lora_modules,
        lora_sources=lora_sources,
        allow_runtime_updates=allow_runtime_lora_updating,
    )
    app = build_app(engine, served_model_name, metrics, guard, tools, models)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,  # ours (JSON) stays in place
        access_log=False,  # RequestIdMiddleware logs each request with its id
        timeout_graceful_shutdown=10,
        timeout_keep_alive=5,
        # h11 whatever else is installed: its header bound is the one these settings set.
        http=h11_with_header_timeout(guard.header_timeout),
        limit_concurrency=guard.max_connections,
        h11_max_incomplete_event_size=guard.max_header_bytes,
    )
    server = _DrainingServer(config, engine, drain_timeout)
    engine.on_fatal = server.stop
    log.info(
        "starting",
        model=engine_args.model,
        served_model_name=served_model_name,
        port=port,
        auth=bool(guard.api_key),
    )
    if allow_runtime_lora_updating:
        log.warning("runtime LoRA updating is on: clients may load and unload adapters")
    if inject_step_delay:
        log.warning("fault injection: every engine step is delayed", seconds=inject_step_delay)
    server.run()
    if engine.error is not None:
        log.error("exiting: the engine failed", error=str(engine.error))
        return 1
    return 0
