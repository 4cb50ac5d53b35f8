"""OpenAI request and response bodies (pydantic v2).

Requests are strict: a value of the wrong JSON type is a 400 that names the field, rather than
being coerced ("0.5" is not a number). Bounds live here too, so the error can name the offending
parameter. A top-level field we do not know is accepted and ignored with a logged warning (as
vLLM does, so a newer client does not break); one we know but do not implement is a 400 naming it
(server/extra_fields.py). Nested objects stay closed.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kvpilot_engine.sampling_params import MAX_LOGIT_BIAS

# Choices per request (prompts x n for completions); more is almost certainly a mistake and would
# hog the KV cache. A request's sequences are admitted together, so this also bounds admission.
MAX_N = 16
MAX_LOGPROBS = 20  # the engine's top-k logprobs limit
# List lengths, so that a body within the size limit still cannot ask for unbounded work: OpenAI's
# limit on stop sequences, and generous caps on the others (each stop token id is checked per
# step, each message is templated).
MAX_STOP = 4
MAX_STOP_TOKEN_IDS = 64
MAX_MESSAGES = 2048
MAX_TOOLS = 128  # OpenAI's limit


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _OpenRequest(BaseModel):
    """A top-level body or a message: unknown fields kept in model_extra for the server to judge."""

    model_config = ConfigDict(extra="allow", strict=True)


# ---- structured outputs and tools ---------------------------------------------------------------
class JsonSchemaFormat(_Request):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(_Request):
    """vLLM's `structured_outputs` body field: StructuredOutputsParams' fields."""

    json_: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool | None = None


class FunctionDefinition(_Request):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: FunctionName


class FunctionCall(_Request):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False


# Sampling fields shared by both endpoints: OpenAI's names, plus vLLM's extras that clients use.
class _SamplingRequest(_OpenRequest):
    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    # Token ids (as JSON object keys) -> bias in [-100, 100]; ids past the vocabulary are the
    # engine's 400.
    logit_bias: dict[str, float] | None = None
    # vLLM extensions.
    repetition_penalty: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[int], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    priority: int = 0
    # Structured outputs: OpenAI's response_format, vLLM's guided_* extras and their newer form.
    response_format: ResponseFormat | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputsRequest | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        # A validator rather than a bound in the type: in the union, the error would name `str`.
        if isinstance(stop, list) and len(stop) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stop)}")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for token, value in (bias or {}).items():
            # isascii: str.isdigit() also accepts digits like "²", which int() rejects.
            if not (token.isascii() and token.isdigit()):
                raise ValueError(f"keys must be token ids (non-negative integers), got {token!r}")
            if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise ValueError(f"values must be in [-100, 100], got {value} for token {token}")
        return bias


class CompletionRequest(_SamplingRequest):
    # One prompt (text or token ids) or several (a list of texts or of token-id lists).
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None  # no fill-in-the-middle: only empty is accepted (the server)
    best_of: Annotated[int, Field(ge=1)] | None = None  # only equal to n (the server)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_OpenRequest):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # None only on an assistant message that carries tool_calls (the server checks).
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls, sent back with the results
    tool_call_id: str | None = None  # a tool message: which call this is the result of

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: Annotated[list[ChatTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


# ---- responses (plain models: we build them, nothing to validate) ------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class _ChoiceBase(BaseModel):
    index: int
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class _ResponseBase(BaseModel):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str


class CompletionChoice(_ChoiceBase):
    text: str
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(_ResponseBase):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(_ChoiceBase):
    message: ResponseMessage
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(_ResponseBase):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "kvpilot"
    root: str | None = None
    # A LoRA adapter's card names its base model's card (vLLM's shape); None for the base.
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadLoRAAdapterRequest(_Request):
    """POST /v1/load_lora_adapter, as vLLM takes it."""

    lora_name: Annotated[str, Field(min_length=1, max_length=256)]
    lora_path: Annotated[str, Field(min_length=1, max_length=4096)]


class UnloadLoRAAdapterRequest(_Request):
    """POST /v1/unload_lora_adapter; vLLM's optional `lora_int_id` is accepted and not needed."""

    lora_name: Annotated[str, Field(min_length=1, max_length=256)]
    lora_int_id: int | None = None


def dump(model: BaseModel, **kw: Any) -> str:
    """JSON text for a response body or SSE event."""
    return model.model_dump_json(**kw)
