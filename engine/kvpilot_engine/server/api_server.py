"""The OpenAI-compatible HTTP server: FastAPI app, error mapping, SSE streaming, and `serve`.

Request bodies are parsed here with pydantic (not by FastAPI), so malformed JSON, invalid UTF-8
and wrong types all become the same OpenAI-shaped 400. Every failure a client can cause maps to a
4xx; only our own bugs are 500s.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from types import FrameType
from typing import Any, TypeVar

import structlog
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvpilot_engine.config import EngineArgs
from kvpilot_engine.llm_engine import InvalidRequestError, LLMEngine
from kvpilot_engine.outputs import CompletionOutput, Logprob, RequestOutput
from kvpilot_engine.sampling_params import SamplingParams
from kvpilot_engine.server.async_engine import (
    AsyncLLMEngine,
    EngineOverloadedError,
    EngineUnavailableError,
    RequestStream,
)
from kvpilot_engine.server.logs import configure_logging
from kvpilot_engine.server.metrics import ServerMetrics
from kvpilot_engine.server.protocol import (
    MAX_N,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatStreamChoice,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    ResponseMessage,
    TopLogprob,
    UsageInfo,
)

log = structlog.get_logger("kvpilot.server")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
MIN_LOGPROB = -9999.0  # OpenAI's floor; -inf is not JSON


# ---- errors ------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _validation_error(e: ValidationError) -> APIError:
    err = e.errors(include_url=False)[0]
    loc = [str(x) for x in err.get("loc", ())]
    if err["type"] == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {err['msg']}", code="invalid_json")
    where = ".".join(loc)
    msg = f"{where}: {err['msg']}" if where else err["msg"]
    return APIError(400, msg, param=loc[0] if loc else None, code="invalid_value")


def _from_engine_error(e: Exception) -> APIError:
    if isinstance(e, InvalidRequestError):
        code = "context_length_exceeded" if "context length" in str(e) else "invalid_value"
        return APIError(400, str(e), param=e.param, code=code)
    if isinstance(e, EngineOverloadedError):
        headers = {"Retry-After": str(e.retry_after)}
        return APIError(503, str(e), code="overloaded", headers=headers)
    if isinstance(e, EngineUnavailableError):
        return APIError(503, str(e), code="unavailable", headers={"Retry-After": "5"})
    if isinstance(e, ValueError):  # SamplingParams' own checks, or a chat template refusing
        return APIError(400, str(e), code="invalid_value")
    raise e


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


# ---- helpers -----------------------------------------------------------------------------------
T = TypeVar("T", bound=BaseModel)


async def _parse(request: Request, model: type[T]) -> T:
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as e:
        raise _validation_error(e) from None


def _sampling_params(
    req: CompletionRequest | ChatCompletionRequest, max_tokens: int | None, logprobs: int | None
) -> SamplingParams:
    try:
        return SamplingParams(
            n=req.n,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=-1 if req.top_k is None else req.top_k,
            min_p=req.min_p or 0.0,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
            # The keys were checked to be digits (protocol); out-of-vocabulary ids are the engine's.
            logit_bias={int(t): b for t, b in (req.logit_bias or {}).items()} or None,
            seed=req.seed,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            stop=req.stop,
            stop_token_ids=req.stop_token_ids or [],
            ignore_eos=req.ignore_eos,
            include_stop_str_in_output=req.include_stop_str_in_output,
            logprobs=logprobs,
            skip_special_tokens=req.skip_special_tokens,
        )
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_value") from None


def _completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    """The request's prompts, as OpenAI and vLLM accept them: a text, a token-id list, or a list
    of either. Each becomes one engine request with n choices."""
    p = req.prompt
    several = isinstance(p, list) and bool(p) and isinstance(p[0], (str, list))
    prompts: list[str | list[int]] = list(p) if several else [p]  # type: ignore[arg-type]
    empty = next((i for i, x in enumerate(prompts) if not x), None)
    if empty is not None:
        which = f"prompt {empty}" if several else "the prompt"
        raise APIError(400, f"{which} must not be empty", param="prompt", code="invalid_value")
    # Counted like n: each choice is a sequence holding KV blocks, admitted with the request.
    if len(prompts) * req.n > MAX_N:
        raise APIError(
            400,
            f"{len(prompts)} prompts with n={req.n} make {len(prompts) * req.n} choices; at most "
            f"{MAX_N} per request (split the prompts over several requests)",
            param="prompt",
            code="invalid_value",
        )
    return prompts


def _check_completion_options(req: CompletionRequest) -> None:
    if req.suffix:  # SmolLM2 and the other served models have no fill-in-the-middle tokens
        raise APIError(400, "suffix is not supported", param="suffix", code="unsupported")
    if req.best_of is not None and req.best_of < req.n:
        raise APIError(400, "best_of must be at least n", param="best_of", code="invalid_value")
    if req.best_of is not None and req.best_of > req.n:
        raise APIError(
            400,
            "best_of greater than n is not supported (choices are not ranked); leave it out",
            param="best_of",
            code="unsupported",
        )
    if req.echo and req.logprobs is not None:
        # The echoed prompt would need prompt logprobs, which the engine does not compute.
        raise APIError(
            400,
            "echo with logprobs is not supported (no prompt logprobs); drop one of them",
            param="echo",
            code="unsupported",
        )


def _echo_text(engine: LLMEngine, prompt: str | list[int]) -> str:
    """The prompt as `echo` prepends it: the text as sent, or token ids decoded as they are."""
    if isinstance(prompt, str):
        return prompt
    return engine.tokenizer.decode(prompt, skip_special_tokens=False)


def _chat_prompt(engine: LLMEngine, req: ChatCompletionRequest) -> list[int]:
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except Exception as e:  # the template's raise_exception, or no template: the input's fault
        raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
    return engine.tokenizer.encode(text, add_special_tokens=False)


def _logprob(value: float) -> float:
    return max(value, MIN_LOGPROB)


def _completion_logprobs(
    token_ids: list[int], entries: list[dict[int, Logprob]], offset: int
) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for tid, entry in zip(token_ids, entries, strict=False):
        sampled = entry.get(tid)
        token = (sampled.decoded_token if sampled else None) or ""
        out.tokens.append(token)
        out.token_logprobs.append(_logprob(sampled.logprob) if sampled else None)
        out.top_logprobs.append(
            {(lp.decoded_token or ""): _logprob(lp.logprob) for lp in entry.values()}
        )
        out.text_offset.append(offset)
        offset += len(token)
    return out


def _chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], k: int) -> ChatLogprobs:
    content = []
    for tid, entry in zip(token_ids, entries, strict=False):
        sampled = entry.get(tid)
        token = (sampled.decoded_token if sampled else None) or ""
        top = [
            TopLogprob(
                token=lp.decoded_token or "",
                logprob=_logprob(lp.logprob),
                bytes=list((lp.decoded_token or "").encode()),
            )
            for lp in list(entry.values())[:k]  # the engine lists the top k first, by rank
        ]
        content.append(
            ChatTokenLogprob(
                token=token,
                logprob=_logprob(sampled.logprob) if sampled else MIN_LOGPROB,
                bytes=list(token.encode()),
                top_logprobs=top,
            )
        )
    return ChatLogprobs(content=content)


@dataclass
class _Choice:
    """One choice, accumulated from the engine's deltas."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _Usage:
    """Token counts per engine request, summed into the response's usage; each request is logged
    when it finishes."""

    prompt_tokens: dict[str, int] = field(default_factory=dict)
    completion_tokens: dict[str, int] = field(default_factory=dict)

    def add(self, out: RequestOutput) -> None:
        rid = out.request_id
        self.prompt_tokens[rid] = len(out.prompt_token_ids)
        n_out = self.completion_tokens.get(rid, 0) + sum(len(c.token_ids) for c in out.outputs)
        self.completion_tokens[rid] = n_out
        if out.finished:
            _log_done(out, n_out)

    def info(self) -> UsageInfo:
        prompt, completion = sum(self.prompt_tokens.values()), sum(self.completion_tokens.values())
        return UsageInfo(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )


async def _choice_outputs(
    stream: RequestStream, n: int, usage: _Usage
) -> AsyncIterator[tuple[int, CompletionOutput]]:
    """Each completion delta with its choice index: prompt i's sample j is choice i * n + j,
    as vLLM numbers them (the stream's requests are the prompts, in order)."""
    first = {rid: i * n for i, rid in enumerate(stream.request_ids)}
    async for out in stream.outputs():
        usage.add(out)
        for c in out.outputs:
            yield first[out.request_id] + c.index, c


async def _collect(stream: RequestStream, n: int, usage: _Usage) -> list[_Choice]:
    choices = [_Choice() for _ in range(len(stream.request_ids) * n)]
    async for i, c in _choice_outputs(stream, n, usage):
        ch = choices[i]
        ch.text += c.text
        ch.token_ids += c.token_ids
        ch.logprobs += c.logprobs or []
        if c.finish_reason:
            ch.finish_reason, ch.stop_reason = c.finish_reason, c.stop_reason
    return choices


async def _full_response(
    stream: RequestStream, n: int, build: Callable[[list[_Choice], UsageInfo], BaseModel]
) -> Response:
    """A non-streaming answer: collect the choices, and reply with the body `build` makes."""
    usage = _Usage()
    choices = await _collect(stream, n, usage)
    body = build(choices, usage.info())
    return Response(body.model_dump_json(), media_type="application/json")


def _log_done(last: RequestOutput, completion_tokens: int) -> None:
    m = last.metrics
    ttft = m.time_to_first_token
    log.info(
        "request_finished",
        engine_request_id=last.request_id,
        prompt_tokens=len(last.prompt_token_ids),
        completion_tokens=completion_tokens,
        cached_tokens=last.num_cached_tokens,
        ttft_ms=None if ttft is None else round(ttft * 1000, 1),
        finish_reasons=sorted({c.finish_reason or "" for c in last.outputs}),
    )


def _sse(model: BaseModel) -> str:
    return f"data: {model.model_dump_json()}\n\n"


def _sse_error(e: Exception) -> str:
    log.error("stream failed", exc_info=e)
    body = ErrorResponse(error=ErrorInfo(message=str(e), type="server_error", code=500))
    return _sse(body)


async def _until_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Run a non-streaming request, cancelling it (and so aborting the engine request) if the
    client hangs up first: nobody would read the answer, so its KV blocks are better freed."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it


# ---- the app -----------------------------------------------------------------------------------
def build_app(engine: AsyncLLMEngine, served_model_name: str, metrics: ServerMetrics) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="kvpilot", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(RequestIdMiddleware)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        if e.status >= 500:
            log.warning("request refused", status=e.status, reason=e.message)
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), headers=e.headers)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception) -> JSONResponse:
        log.error("internal error", exc_info=e)
        return error_response(500, "internal server error; see the server log", code="internal")

    def check_model(name: str) -> None:
        if name != served_model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {served_model_name!r}",
                param="model",
                code="model_not_found",
            )

    def loaded_engine() -> LLMEngine:
        if engine.engine is None or not engine.ready:
            raise _from_engine_error(EngineUnavailableError("the model is still loading"))
        return engine.engine

    async def submit(
        rids: list[str],
        prompts: list[str | list[int]],
        params: list[SamplingParams],
        priority: int,
        arrival: float,
    ) -> RequestStream:
        """One engine request per prompt, admitted together on one stream."""
        try:
            stream = await engine.add_requests(rids, prompts, params, priority, arrival)
        except (ValueError, EngineOverloadedError, EngineUnavailableError) as e:
            if isinstance(e, EngineOverloadedError):
                metrics.rejected.inc(len(rids))
            raise _from_engine_error(e) from None
        metrics.received.inc(len(rids))
        return stream

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
    async def models() -> ModelList:
        e = engine.engine
        card = ModelCard(
            id=served_model_name,
            root=e.checkpoint.name if e is not None else None,
            max_model_len=e.max_model_len if e is not None else None,
        )
        return ModelList(data=[card])

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        arrival = time.monotonic()
        req = await _parse(request, CompletionRequest)
        check_model(req.model)
        llm = loaded_engine()
        _check_completion_options(req)
        prompts = _completion_prompts(req)
        params = _sampling_params(req, req.max_tokens, req.logprobs)
        rid = f"cmpl-{uuid.uuid4().hex}"
        # Each prompt its own params: the engine fills in max_tokens per prompt.
        stream = await submit(
            [f"{rid}-{i}" for i in range(len(prompts))],
            prompts,
            [replace(params) for _ in prompts],
            req.priority,
            arrival,
        )
        created = int(time.time())
        with_logprobs = req.logprobs is not None
        # Per choice, the text before what it generated: the prompt when echoing.
        prefixes = [_echo_text(llm, p) if req.echo else "" for p in prompts]
        echo = [text for text in prefixes for _ in range(req.n)]

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _completion_events(
                    stream, rid, created, req.model, req.n, echo, with_logprobs, include_usage
                ),
                media_type="text/event-stream",
            )

        def body(choices: list[_Choice], usage: UsageInfo) -> CompletionResponse:
            return CompletionResponse(
                id=rid,
                created=created,
                model=req.model,
                choices=[
                    CompletionChoice(
                        index=i,
                        text=echo[i] + c.text,
                        logprobs=(
                            _completion_logprobs(c.token_ids, c.logprobs, 0)
                            if with_logprobs
                            else None
                        ),
                        finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason,
                    )
                    for i, c in enumerate(choices)
                ],
                usage=usage,
            )

        return await _until_disconnect(request, _full_response(stream, req.n, body))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        arrival = time.monotonic()
        req = await _parse(request, ChatCompletionRequest)
        check_model(req.model)
        llm = loaded_engine()
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        k = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens or req.max_tokens
        params = _sampling_params(req, max_tokens, k)
        prompt = _chat_prompt(llm, req)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            stream = await submit([rid], [prompt], [params], req.priority, arrival)
        except APIError as e:
            if e.param == "prompt":  # the prompt is the rendered messages
                e.param = "messages"
            raise
        created = int(time.time())

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _chat_events(stream, rid, created, req.model, req.n, k, include_usage),
                media_type="text/event-stream",
            )

        def body(choices: list[_Choice], usage: UsageInfo) -> ChatCompletionResponse:
            return ChatCompletionResponse(
                id=rid,
                created=created,
                model=req.model,
                choices=[
                    ChatChoice(
                        index=i,
                        message=ResponseMessage(content=c.text),
                        logprobs=(
                            _chat_logprobs(c.token_ids, c.logprobs, k) if k is not None else None
                        ),
                        finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason,
                    )
                    for i, c in enumerate(choices)
                ],
                usage=usage,
            )

        return await _until_disconnect(request, _full_response(stream, req.n, body))

    return app


# ---- SSE streams -------------------------------------------------------------------------------
async def _completion_events(
    stream: RequestStream,
    rid: str,
    created: int,
    model: str,
    n: int,
    echo: list[str],
    with_logprobs: bool,
    include_usage: bool,
) -> AsyncIterator[str]:
    """`echo[i]`: text that choice i's first chunk starts with (its prompt, or nothing)."""
    offsets: dict[int, int] = {}
    usage = _Usage()
    try:
        async for i, c in _choice_outputs(stream, n, usage):
            text = c.text if i in offsets else echo[i] + c.text
            if not (text or c.finish_reason or (with_logprobs and c.token_ids)):
                continue
            lps = None
            if with_logprobs:
                lps = _completion_logprobs(c.token_ids, c.logprobs or [], offsets.get(i, 0))
            offsets[i] = offsets.get(i, 0) + len(text)
            choice = CompletionChoice(
                index=i,
                text=text,
                logprobs=lps,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            yield _sse(CompletionResponse(id=rid, created=created, model=model, choices=[choice]))
        if include_usage and usage.prompt_tokens:
            yield _sse(
                CompletionResponse(
                    id=rid, created=created, model=model, choices=[], usage=usage.info()
                )
            )
        yield "data: [DONE]\n\n"
    except Exception as e:  # the engine failed mid-stream; the status line is long gone
        yield _sse_error(e)
    finally:
        stream.cancel()


async def _chat_events(
    stream: RequestStream,
    rid: str,
    created: int,
    model: str,
    n: int,
    k: int | None,
    include_usage: bool,
) -> AsyncIterator[str]:
    def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
        return _sse(
            ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage)
        )

    usage = _Usage()
    try:
        for i in range(n):  # OpenAI opens every choice with the role
            yield chunk(
                [ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))]
            )
        async for i, c in _choice_outputs(stream, n, usage):
            if not (c.text or c.finish_reason or (k is not None and c.token_ids)):
                continue
            lps = _chat_logprobs(c.token_ids, c.logprobs or [], k) if k is not None else None
            delta = DeltaMessage(content=c.text or None)
            choice = ChatStreamChoice(
                index=i, delta=delta, logprobs=lps, finish_reason=c.finish_reason
            )
            yield chunk([choice])
        if include_usage and usage.prompt_tokens:
            yield chunk([], usage.info())
        yield "data: [DONE]\n\n"
    except Exception as e:
        yield _sse_error(e)
    finally:
        stream.cancel()


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
) -> int:
    configure_logging(log_level)
    metrics = ServerMetrics(served_model_name)
    engine = AsyncLLMEngine(lambda: LLMEngine(engine_args), metrics, max_waiting, inject_step_delay)
    app = build_app(engine, served_model_name, metrics)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,  # ours (JSON) stays in place
        access_log=False,  # RequestIdMiddleware logs each request with its id
        timeout_graceful_shutdown=10,
        timeout_keep_alive=5,
    )
    server = _DrainingServer(config, engine, drain_timeout)
    engine.on_fatal = server.stop
    log.info("starting", model=engine_args.model, served_model_name=served_model_name, port=port)
    if inject_step_delay:
        log.warning("fault injection: every engine step is delayed", seconds=inject_step_delay)
    server.run()
    if engine.error is not None:
        log.error("exiting: the engine failed", error=str(engine.error))
        return 1
    return 0
