"""POST /v1/chat/completions: messages rendered through the model's chat template, n choices.

The rendered messages are one engine request, so an engine refusal that names the prompt names
`messages` here. A stream opens every choice with the assistant role, as OpenAI's does. Tools and
tool_choice are server/tools.py's; response_format and the guided_* fields become the request's
StructuredOutputsParams (server/structured_outputs.py), compiled off the event loop.
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
from kvpilot_engine.server.async_engine import AsyncLLMEngine, RequestStream
from kvpilot_engine.server.errors import APIError, sse_error
from kvpilot_engine.server.guard import GuardSettings, request_priority
from kvpilot_engine.server.metrics import ServerMetrics
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
from kvpilot_engine.server.serving_models import OpenAIServingModels
from kvpilot_engine.server.tools import (
    ToolContext,
    ToolSettings,
    check_messages,
    render_messages,
    tool_constraint,
    tool_context,
)


class OpenAIServingChat(OpenAIServing):
    def __init__(
        self,
        engine: AsyncLLMEngine,
        served_model_name: str,
        metrics: ServerMetrics,
        guard: GuardSettings,
        models: OpenAIServingModels,
        tools: ToolSettings | None = None,
    ):
        super().__init__(engine, served_model_name, metrics, guard, models)
        self.tools = tools or ToolSettings()

    async def create_chat_completion(self, request: Request) -> Response:
        arrival = time.monotonic()
        req = await self.parse(request, ChatCompletionRequest)
        lora = self.check_model(req.model)
        priority = request_priority(request.headers, req.priority, self.guard)
        llm = self.loaded_engine()
        tools = tool_context(req, self.tools)
        params, k = chat_params(req, tools)
        # Off the event loop: a template over thousands of messages and the tokenisation of
        # megabytes of text take long enough to stall every stream and probe on this server;
        # so does compiling a large JSON schema (cached: the next request with it is free).
        prompt = await asyncio.to_thread(chat_prompt, llm, req, tools)
        await self.compile_grammar(llm, params)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            stream = await self.submit(
                [rid],
                [prompt],
                [params],
                priority,
                arrival,
                lora,
            )
        except APIError as e:
            if e.param == "prompt":  # the prompt is the rendered messages
                e.param = "messages"
            raise
        created = int(time.time())

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _chat_events(stream, rid, created, req.model, req.n, k, include_usage, tools),
                media_type="text/event-stream",
            )

        def body(choices: list[Choice], usage: UsageInfo) -> ChatCompletionResponse:
            return chat_response(rid, created, req.model, choices, usage, k, tools)

        return await until_disconnect(request, full_response(stream, req.n, body))


def chat_params(
    req: ChatCompletionRequest, tools: ToolContext | None = None
) -> tuple[SamplingParams, int | None]:
    """The request's sampling parameters, and k top logprobs per token (None: no logprobs)."""
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    k = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = req.max_completion_tokens or req.max_tokens
    params = sampling_params(req, max_tokens, k)
    constraint = tool_constraint(tools) if tools is not None else None
    if constraint is not None:
        if params.structured_outputs is not None:
            raise APIError(
                400,
                f"tool_choice {tools.mode if tools else ''} already constrains the output; "
                f"drop {params.structured_outputs.source_param}",  # type: ignore[union-attr]
                param="tool_choice",
                code="invalid_value",
            )
        params.structured_outputs = constraint
    return params, k


def chat_response(
    rid: str,
    created: int,
    model: str,
    choices: list[Choice],
    usage: UsageInfo,
    k: int | None,
    tools: ToolContext | None = None,
) -> ChatCompletionResponse:
    """The non-streaming body (the server's, and each line of `kvpilot run-batch`)."""
    out = []
    for i, c in enumerate(choices):
        content, calls = tools.output(c.text, c.finish_reason) if tools else (c.text, [])
        finish = "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason
        out.append(
            ChatChoice(
                index=i,
                message=ResponseMessage(content=content, tool_calls=calls),
                logprobs=_chat_logprobs(c.token_ids, c.logprobs, k) if k is not None else None,
                finish_reason=finish,
                stop_reason=c.stop_reason,
            )
        )
    return ChatCompletionResponse(id=rid, created=created, model=model, choices=out, usage=usage)


def chat_prompt(
    engine: LLMEngine, req: ChatCompletionRequest, tools: ToolContext | None = None
) -> list[int]:
    check_messages(req.messages)
    messages, extra = render_messages(
        req.messages, tools or ToolContext("none"), engine.tokenizer.chat_template
    )
    try:
        text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **extra)
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
    tools: ToolContext | None = None,
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
        calls = [tools.stream() if tools else None for _ in range(n)]
        async for i, c in choice_outputs(stream, n, usage):
            if not (c.text or c.finish_reason or (k is not None and c.token_ids)):
                continue
            lps = _chat_logprobs(c.token_ids, c.logprobs or [], k) if k is not None else None
            tc, text, finish, deltas = calls[i], c.text, c.finish_reason, None
            if tc is not None:
                # Tool calls are held back until the choice ends, then sent whole.
                text = tc.feed(c.text)
                if finish is not None:
                    rest, deltas = tc.finish(finish)
                    text += rest
                    if deltas and finish == "stop":
                        finish = "tool_calls"
                if not (text or finish or lps):
                    continue
            delta = DeltaMessage(content=text or None, tool_calls=deltas or None)
            choice = ChatStreamChoice(index=i, delta=delta, logprobs=lps, finish_reason=finish)
            yield chunk([choice])
        if include_usage and usage.prompt_tokens:
            yield chunk([], usage.info())
        yield "data: [DONE]\n\n"
    except Exception as e:
        yield sse_error(e)
    finally:
        stream.cancel()
