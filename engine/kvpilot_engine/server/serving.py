"""OpenAIServing: what the completion and chat endpoints share.

Request bodies are read with a limit (413 past it) and parsed here with pydantic (not by
FastAPI), so malformed JSON, invalid UTF-8 and wrong types all become the same OpenAI-shaped 400;
a large body is parsed on a worker thread, as prompts are templated and tokenised, so that the
event loop keeps answering /health and streaming tokens meanwhile. Then: the model name and a
loaded engine are checked (the name may select a LoRA adapter), the request's sampling fields
become SamplingParams, its prompts are submitted as engine requests on one stream, and the stream
is read back, either whole (the choices collected into one response, cancelled if the client hangs
up first) or choice by choice for SSE.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import structlog
from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from kvpilot_engine.llm_engine import LLMEngine
from kvpilot_engine.lora.request import LoRARequest
from kvpilot_engine.outputs import CompletionOutput, Logprob, RequestOutput
from kvpilot_engine.sampling_params import SamplingParams
from kvpilot_engine.server.async_engine import (
    AsyncLLMEngine,
    EngineOverloadedError,
    EngineUnavailableError,
    RequestStream,
)
from kvpilot_engine.server.errors import APIError, from_engine_error, validation_error
from kvpilot_engine.server.guard import GuardSettings, read_body
from kvpilot_engine.server.metrics import ServerMetrics
from kvpilot_engine.server.protocol import ChatCompletionRequest, CompletionRequest, UsageInfo
from kvpilot_engine.server.serving_models import OpenAIServingModels
from kvpilot_engine.server.structured_outputs import check_extra_fields, structured_outputs

log = structlog.get_logger("kvpilot.server")

MIN_LOGPROB = -9999.0  # OpenAI's floor; -inf is not JSON

T = TypeVar("T", bound=BaseModel)


# Bodies above this are parsed off the event loop (a thread hop costs more than parsing less).
OFFLOAD_BYTES = 64 * 1024


class OpenAIServing:
    def __init__(
        self,
        engine: AsyncLLMEngine,
        served_model_name: str,
        metrics: ServerMetrics,
        guard: GuardSettings,
        models: OpenAIServingModels,
    ):
        self.engine = engine
        self.served_model_name = served_model_name
        self.metrics = metrics
        self.guard = guard
        self.models = models

    async def parse(self, request: Request, model: type[T]) -> T:
        body = await read_body(request, self.guard.max_request_bytes)
        if len(body) > OFFLOAD_BYTES:
            req = await asyncio.to_thread(_validate, model, body)
        else:
            req = _validate(model, body)
        if isinstance(req, CompletionRequest | ChatCompletionRequest):
            check_extra_fields(req)
        return req

    async def compile_grammar(self, llm: LLMEngine, params: SamplingParams) -> None:
        """Compile the request's structured-output grammar on a worker thread (a 400 naming
        the parameter if it does not compile), so the engine thread finds it in the cache."""
        if params.structured_outputs is None:
            return
        try:
            await asyncio.to_thread(llm.compile_structured_outputs, params)
        except ValueError as e:
            raise from_engine_error(e) from None

    def check_model(self, name: str) -> LoRARequest | None:
        """The LoRA adapter `name` selects (None: the base model); 404 model_not_found if this
        server serves no such model."""
        return self.models.lora_for(name)

    def loaded_engine(self) -> LLMEngine:
        if self.engine.engine is None or not self.engine.ready:
            raise from_engine_error(EngineUnavailableError("the model is still loading"))
        return self.engine.engine

    async def submit(
        self,
        rids: list[str],
        prompts: list[str | list[int]],
        params: list[SamplingParams],
        priority: int,
        arrival: float,
        lora_request: LoRARequest | None = None,
    ) -> RequestStream:
        """One engine request per prompt, admitted together on one stream."""
        try:
            stream = await self.engine.add_requests(
                rids, prompts, params, priority, arrival, lora_request
            )
        except (ValueError, EngineOverloadedError, EngineUnavailableError) as e:
            if isinstance(e, EngineOverloadedError):
                self.metrics.rejected.inc(len(rids))
            raise from_engine_error(e) from None
        self.metrics.received.inc(len(rids))
        return stream


def _validate(model: type[T], body: bytes) -> T:
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise validation_error(e) from None


def sampling_params(
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
            structured_outputs=structured_outputs(req),
        )
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_value") from None


def clamp_logprob(value: float) -> float:
    return max(value, MIN_LOGPROB)


@dataclass
class Choice:
    """One choice, accumulated from the engine's deltas."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class Usage:
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


async def choice_outputs(
    stream: RequestStream, n: int, usage: Usage
) -> AsyncIterator[tuple[int, CompletionOutput]]:
    """Each completion delta with its choice index: prompt i's sample j is choice i * n + j,
    as vLLM numbers them (the stream's requests are the prompts, in order)."""
    first = {rid: i * n for i, rid in enumerate(stream.request_ids)}
    async for out in stream.outputs():
        usage.add(out)
        for c in out.outputs:
            yield first[out.request_id] + c.index, c


async def _collect(stream: RequestStream, n: int, usage: Usage) -> list[Choice]:
    choices = [Choice() for _ in range(len(stream.request_ids) * n)]
    async for i, c in choice_outputs(stream, n, usage):
        ch = choices[i]
        ch.text += c.text
        ch.token_ids += c.token_ids
        ch.logprobs += c.logprobs or []
        if c.finish_reason:
            ch.finish_reason, ch.stop_reason = c.finish_reason, c.stop_reason
    return choices


async def full_response(
    stream: RequestStream, n: int, build: Callable[[list[Choice], UsageInfo], BaseModel]
) -> Response:
    """A non-streaming answer: collect the choices, and reply with the body `build` makes."""
    usage = Usage()
    choices = await _collect(stream, n, usage)
    body = build(choices, usage.info())
    return Response(body.model_dump_json(), media_type="application/json")


async def until_disconnect(request: Request, work: Awaitable[Response]) -> Response:
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


def sse(model: BaseModel) -> str:
    return f"data: {model.model_dump_json()}\n\n"
