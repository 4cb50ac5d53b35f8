"""Tool calling for /v1/chat/completions: checking `tools` and `tool_choice`, rendering the tools
into the prompt, the grammar behind `required` and named choices, and turning output into
OpenAI `tool_calls` (whole and streamed).

- `tool_choice` defaults to `auto` when tools are given, else `none` (OpenAI's defaults).
- `auto` needs `kvpilot serve --enable-auto-tool-choice --tool-call-parser NAME` (as in vLLM): the
  model decides, and the parser finds calls in its text.
- `required` and a named function are enforced by a JSON-schema grammar, so they always parse:
  a named function's output is its arguments object; `required`'s is an array of
  `{"name", "parameters"}` objects, one schema branch per tool (vLLM's shape).
- `none`: the tools are not rendered and the output is plain content.

Rendering: a chat template that mentions `tools` gets them as the `tools` variable (and tool
calls and results as messages, arguments as objects), as transformers passes them. Templates
without tool support (SmolLM2's among them) get kvpilot's Hermes-style tool prompt at the head
of the system message; earlier assistant calls are written back as `<tool_call>` blocks and tool
results as user turns holding `<tool_response>` blocks, which any template renders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kvpilot_engine.server.errors import APIError
from kvpilot_engine.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)
from kvpilot_engine.structured import GrammarError, StructuredOutputsParams
from kvpilot_engine.structured.backend import check_json_schema
from kvpilot_engine.tool_parsers import (
    HermesToolParser,
    ParsedToolCall,
    StreamingToolCalls,
    ToolParser,
    get_tool_parser,
)

TOOL_PROMPT = (
    "You are a function calling AI model. You are provided with function signatures within "
    "<tools></tools> XML tags. You may call one or more functions to assist with the user query. "
    "Don't make assumptions about what values to plug into functions. Here are the available "
    "tools: <tools>\n{tools}\n</tools>\nFor each function call, return a JSON object with the "
    "function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@dataclass
class ToolSettings:
    """The server's tool-calling flags."""

    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None


@dataclass
class ToolContext:
    """One request's tool mode: how to render its tools and read its output."""

    mode: str  # none, auto, required, named
    tools: list[dict[str, Any]] = field(default_factory=list)  # OpenAI tool objects
    named: str | None = None
    parser: ToolParser | None = None

    @property
    def constrained(self) -> bool:
        return self.mode in ("required", "named")

    def output(self, text: str, finish_reason: str | None) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) for a whole output."""
        calls = self._calls(text, finish_reason)
        if calls is None:
            return text, []
        content, parsed = calls
        return content, [_tool_call(c) for c in parsed]

    def _calls(
        self, text: str, finish_reason: str | None
    ) -> tuple[str | None, list[ParsedToolCall]] | None:
        if self.mode == "none":
            return None
        if self.constrained:
            if finish_reason == "length":  # cut off: the JSON is incomplete
                return None
            value = json.loads(text)
            if self.mode == "named":
                assert self.named is not None
                return None, [ParsedToolCall(self.named, json.dumps(value, ensure_ascii=False))]
            return None, [
                ParsedToolCall(c["name"], json.dumps(c["parameters"], ensure_ascii=False))
                for c in value
            ]
        assert self.parser is not None
        got = self.parser.extract_tool_calls(text)
        return (got.content, got.tool_calls) if got.tools_called else None

    def stream(self) -> ToolStream | None:
        return None if self.mode == "none" else ToolStream(self)


class ToolStream:
    """One choice's stream: content deltas pass through (held while they might begin a call);
    calls go out as whole tool-call deltas once the choice finishes."""

    def __init__(self, ctx: ToolContext):
        self.ctx = ctx
        self.text = ""
        self.inner = StreamingToolCalls(ctx.parser) if ctx.parser and not ctx.constrained else None

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.inner is None:
            return ""  # constrained: everything is the call
        return self.inner.feed(delta)

    def finish(self, finish_reason: str | None) -> tuple[str, list[DeltaToolCall]]:
        if self.inner is not None:
            content, parsed = self.inner.finish()
        else:
            got = self.ctx._calls(self.text, finish_reason)
            content, parsed = (self.text, []) if got is None else ("", got[1])
        deltas = [
            DeltaToolCall(
                index=i,
                id=c.id,
                type="function",
                function=DeltaFunctionCall(name=c.name, arguments=c.arguments),
            )
            for i, c in enumerate(parsed)
        ]
        return content, deltas


def _tool_call(c: ParsedToolCall) -> ToolCall:
    return ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))


def tool_context(req: ChatCompletionRequest, settings: ToolSettings | None) -> ToolContext:
    """Check the request's tools and tool_choice (400s naming the parameter) and decide its mode.
    `settings` None: no server flags to check (offline batches treat auto like none)."""
    tools = req.tools or []
    choice = req.tool_choice
    if choice is not None and not tools and choice != "none":
        raise APIError(400, "tool_choice needs tools", param="tool_choice", code="invalid_value")
    if not tools:
        return ToolContext("none")
    names = [t.function.name for t in tools]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise APIError(
            400, f"tools has two functions named {dup!r}", param="tools", code="invalid_value"
        )
    for t in tools:
        if t.function.parameters is not None:
            try:
                check_json_schema(t.function.parameters)
            except GrammarError as e:
                raise APIError(
                    400, f"tools: function {t.function.name!r}: {e}", param="tools",
                    code="invalid_value",
                ) from None  # fmt: skip
    dumped = [t.model_dump(exclude_none=True) for t in tools]
    if choice is None:
        choice = "auto"
    if not isinstance(choice, str):
        if choice.function.name not in names:
            raise APIError(
                400,
                f"tool_choice names {choice.function.name!r}, which is not in tools "
                f"({', '.join(names)})",
                param="tool_choice",
                code="invalid_value",
            )
        return ToolContext("named", dumped, named=choice.function.name)
    if choice == "auto":
        if settings is None:
            return ToolContext("none", dumped)
        if not (settings.enable_auto_tool_choice and settings.tool_call_parser):
            raise APIError(
                400,
                '"auto" tool choice needs the server started with --enable-auto-tool-choice and '
                '--tool-call-parser; send tool_choice "required" or a named function instead',
                param="tool_choice",
                code="invalid_value",
            )
        return ToolContext("auto", dumped, parser=get_tool_parser(settings.tool_call_parser))
    return ToolContext(choice, dumped)


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def tool_constraint(ctx: ToolContext) -> StructuredOutputsParams | None:
    """The grammar that makes `required` and named choices always parse."""
    if ctx.mode == "named":
        tool = next(t for t in ctx.tools if t["function"]["name"] == ctx.named)
        return StructuredOutputsParams(json=_parameters(tool), source_param="tools")
    if ctx.mode == "required":
        schema = {
            "type": "array",
            "minItems": 1,
            "items": {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string", "enum": [t["function"]["name"]]},
                            "parameters": _parameters(t),
                        },
                        "required": ["name", "parameters"],
                        "additionalProperties": False,
                    }
                    for t in ctx.tools
                ]
            },
        }
        return StructuredOutputsParams(json=schema, source_param="tools")
    return None


def template_supports_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in (chat_template or "")


def render_messages(
    messages: list[ChatMessage], ctx: ToolContext, chat_template: str | None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Messages for the chat template and the extra template variables (`tools`)."""
    native = template_supports_tools(chat_template)
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "assistant" and m.tool_calls:
            if native:
                calls = [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.function.name, "arguments": _args(c)},
                    }
                    for c in m.tool_calls
                ]
                out.append({"role": "assistant", "content": m.text(), "tool_calls": calls})
            else:
                blocks = "\n".join(
                    "<tool_call>\n"
                    + json.dumps({"name": c.function.name, "arguments": _args(c)})
                    + "\n</tool_call>"
                    for c in m.tool_calls
                )
                text = m.text()
                out.append(
                    {"role": "assistant", "content": f"{text}\n{blocks}" if text else blocks}
                )
        elif m.role == "tool":
            if native:
                out.append(
                    {"role": "tool", "content": m.text(), "tool_call_id": m.tool_call_id or ""}
                )
            else:
                out.append(
                    {"role": "user", "content": f"<tool_response>\n{m.text()}\n</tool_response>"}
                )
        else:
            out.append({"role": m.role, "content": m.text()})
    if ctx.mode == "none" or not ctx.tools:
        return out, {}
    if native:
        return out, {"tools": ctx.tools}
    prompt = TOOL_PROMPT.format(tools="\n".join(json.dumps(t) for t in ctx.tools))
    if out and out[0]["role"] in ("system", "developer"):
        out[0] = {**out[0], "role": "system", "content": f"{prompt}\n\n{out[0]['content']}"}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out, {}


def _args(call: ToolCall) -> Any:
    """Arguments as an object for templates (they are JSON text on the wire)."""
    try:
        return json.loads(call.function.arguments)
    except ValueError:
        return call.function.arguments


def check_messages(messages: list[ChatMessage]) -> None:
    for i, m in enumerate(messages):
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            raise APIError(
                400,
                f"messages[{i}].content is required (only an assistant message with tool_calls "
                "may leave it out)",
                param="messages",
                code="invalid_value",
            )
        if m.role == "tool" and not m.tool_call_id:
            raise APIError(
                400, f"messages[{i}]: a tool message needs tool_call_id", param="messages",
                code="invalid_value",
            )  # fmt: skip


__all__ = [
    "HermesToolParser",
    "ToolContext",
    "ToolSettings",
    "check_messages",
    "render_messages",
    "tool_constraint",
    "tool_context",
]
