"""POST /v1/completions: one prompt or several (texts or token ids), each with n choices.

Every prompt is its own engine request; the choices are numbered across them as vLLM does
(prompt i's sample j is choice i * n + j). `echo` prepends the prompt to each choice's text.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from kvpilot_engine.llm_engine import LLMEngine
from kvpilot_engine.outputs import Logprob
from kvpilot_engine.sampling_params import SamplingParams
from kvpilot_engine.server.async_engine import RequestStream
from kvpilot_engine.server.errors import APIError, sse_error
from kvpilot_engine.server.guard import request_priority
from kvpilot_engine.server.protocol import (
    MAX_N,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from kvpilot_engine.server.serving import (
    Choice,
    OpenAIServing,
    Usage,
    choice_outputs,
    clamp_logprob,
    full_response,
    sampling_params,
    sse,
    until_disconnect,
)


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: Request) -> Response:
        arrival = time.monotonic()
        req = await self.parse(request, CompletionRequest)
        lora = self.check_model(req.model)
        priority = request_priority(request.headers, req.priority, self.guard)
        llm = self.loaded_engine()
        prompts, params = completion_params(req)
        rid = f"cmpl-{uuid.uuid4().hex}"
        # Tokenised here, on a worker thread, rather than by the engine: on its thread a long text
        # would hold up every running sequence's next step, on the event loop every stream.
        token_ids = await asyncio.to_thread(tokenize, llm, prompts)
        await self.compile_grammar(llm, params)
        # Each prompt its own params: the engine fills in max_tokens per prompt.
        stream = await self.submit(
            [f"{rid}-{i}" for i in range(len(prompts))],
            token_ids,
            [replace(params) for _ in prompts],
            priority,
            arrival,
            lora,
        )
        created = int(time.time())
        with_logprobs = req.logprobs is not None
        # Per choice, the text before what it generated: the prompt when echoing.
        echo = echo_prefixes(llm, req, prompts)

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _completion_events(
                    stream, rid, created, req.model, req.n, echo, with_logprobs, include_usage
                ),
                media_type="text/event-stream",
            )

        def body(choices: list[Choice], usage: UsageInfo) -> CompletionResponse:
            return completion_response(rid, created, req.model, choices, usage, echo, with_logprobs)

        return await until_disconnect(request, full_response(stream, req.n, body))


def completion_params(req: CompletionRequest) -> tuple[list[str | list[int]], SamplingParams]:
    """The request's prompts and their sampling parameters, its options checked."""
    _check_completion_options(req)
    return _completion_prompts(req), sampling_params(req, req.max_tokens, req.logprobs)


def echo_prefixes(
    engine: LLMEngine, req: CompletionRequest, prompts: list[str | list[int]]
) -> list[str]:
    """Per choice, the text before what it generated: the prompt when echoing."""
    prefixes = [_echo_text(engine, p) if req.echo else "" for p in prompts]
    return [text for text in prefixes for _ in range(req.n)]


def completion_response(
    rid: str,
    created: int,
    model: str,
    choices: list[Choice],
    usage: UsageInfo,
    echo: list[str],
    with_logprobs: bool,
) -> CompletionResponse:
    """The non-streaming body (the server's, and each line of `kvpilot run-batch`)."""
    return CompletionResponse(
        id=rid,
        created=created,
        model=model,
        choices=[
            CompletionChoice(
                index=i,
                text=echo[i] + c.text,
                logprobs=(
                    _completion_logprobs(c.token_ids, c.logprobs, 0) if with_logprobs else None
                ),
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            for i, c in enumerate(choices)
        ],
        usage=usage,
    )


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


def tokenize(engine: LLMEngine, prompts: list[str | list[int]]) -> list[str | list[int]]:
    """Text prompts as token ids, as the engine would encode them (special tokens added)."""
    return [engine.tokenizer.encode_unlocked(p) if isinstance(p, str) else p for p in prompts]


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


def _completion_logprobs(
    token_ids: list[int], entries: list[dict[int, Logprob]], offset: int
) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for tid, entry in zip(token_ids, entries, strict=False):
        sampled = entry.get(tid)
        token = (sampled.decoded_token if sampled else None) or ""
        out.tokens.append(token)
        out.token_logprobs.append(clamp_logprob(sampled.logprob) if sampled else None)
        out.top_logprobs.append(
            {(lp.decoded_token or ""): clamp_logprob(lp.logprob) for lp in entry.values()}
        )
        out.text_offset.append(offset)
        offset += len(token)
    return out


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
    usage = Usage()
    try:
        async for i, c in choice_outputs(stream, n, usage):
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
            yield sse(CompletionResponse(id=rid, created=created, model=model, choices=[choice]))
        if include_usage and usage.prompt_tokens:
            yield sse(
                CompletionResponse(
                    id=rid, created=created, model=model, choices=[], usage=usage.info()
                )
            )
        yield "data: [DONE]\n\n"
    except Exception as e:  # the engine failed mid-stream; the status line is long gone
        yield sse_error(e)
    finally:
        stream.cancel()
