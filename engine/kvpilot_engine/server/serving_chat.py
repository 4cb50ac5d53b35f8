"""POST /v1/chat/completions: messages rendered through the model's chat template, n choices.

The rendered messages are one engine request, so an engine refusal that names the prompt names
`messages` here. A stream opens every choice with the assistant role, as OpenAI's does.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from kvpilot_engine.llm_engine import LLMEngine
from kvpilot_engine.outputs import Logprob
from kvpilot_engine.sampling_params import SamplingParams
from kvpilot_engine.server.async_engine import RequestStream
from kvpilot_engine.server.errors import APIError, sse_error
from kvpilot_engine.server.guard import request_priority
from kvpilot_engine.server.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatStreamChoice,
    ChatTokenLogprob,
    DeltaMessage,
    ResponseMessage,
    TopLogprob,
    UsageInfo,
)
from kvpilot_engine.server.serving import (
    MIN_LOGPROB,
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


class OpenAIServingChat(OpenAIServing):
    async def create_chat_completion(self, request: Request) -> Response:
        arrival = time.monotonic()
        req = await self.parse(request, ChatCompletionRequest)
        self.check_model(req.model)
        priority = request_priority(request.headers, req.priority, self.guard)
        llm = self.loaded_engine()
        params, k = chat_params(req)
        # Off the event loop: a template over thousands of messages and the tokenisation of
        # megabytes of text take long enough to stall every stream and probe on this server.
        prompt = await asyncio.to_thread(chat_prompt, llm, req)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            stream = await self.submit(
                [rid],
                [prompt],
                [params],
                priority,
                arrival,
            )
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

        def body(choices: list[Choice], usage: UsageInfo) -> ChatCompletionResponse:
            return chat_response(rid, created, req.model, choices, usage, k)

        return await until_disconnect(request, full_response(stream, req.n, body))


def chat_params(req: ChatCompletionRequest) -> tuple[SamplingParams, int | None]:
    """The request's sampling parameters, and k top logprobs per token (None: no logprobs)."""
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    k = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = req.max_completion_tokens or req.max_tokens
    return sampling_params(req, max_tokens, k), k


def chat_response(
    rid: str, created: int, model: str, choices: list[Choice], usage: UsageInfo, k: int | None
) -> ChatCompletionResponse:
    """The non-streaming body (the server's, and each line of `kvpilot run-batch`)."""
    return ChatCompletionResponse(
        id=rid,
        created=created,
        model=model,
        choices=[
            ChatChoice(
                index=i,
                message=ResponseMessage(content=c.text),
                logprobs=_chat_logprobs(c.token_ids, c.logprobs, k) if k is not None else None,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            for i, c in enumerate(choices)
        ],
        usage=usage,
    )


def chat_prompt(engine: LLMEngine, req: ChatCompletionRequest) -> list[int]:
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except Exception as e:  # the template's raise_exception, or no template: the input's fault
        raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
    return engine.tokenizer.encode_unlocked(text, add_special_tokens=False)


def _chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], k: int) -> ChatLogprobs:
    content = []
    for tid, entry in zip(token_ids, entries, strict=False):
        sampled = entry.get(tid)
        token = (sampled.decoded_token if sampled else None) or ""
        top = [
            TopLogprob(
                token=lp.decoded_token or "",
                logprob=clamp_logprob(lp.logprob),
                bytes=list((lp.decoded_token or "").encode()),
            )
            for lp in list(entry.values())[:k]  # the engine lists the top k first, by rank
        ]
        content.append(
            ChatTokenLogprob(
                token=token,
                logprob=clamp_logprob(sampled.logprob) if sampled else MIN_LOGPROB,
                bytes=list(token.encode()),
                top_logprobs=top,
            )
        )
    return ChatLogprobs(content=content)


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
        return sse(
            ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage)
        )

    usage = Usage()
    try:
        for i in range(n):  # OpenAI opens every choice with the role
            yield chunk(
                [ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))]
            )
        async for i, c in choice_outputs(stream, n, usage):
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
        yield sse_error(e)
    finally:
        stream.cancel()
