"""Tool-call parsers (Hermes, Llama-3 JSON, Mistral), the streaming splitter, and the tool
prompt for chat templates without tool support: pure functions, no model."""

from __future__ import annotations

import json

import pytest
from kvpilot_engine.server.protocol import ChatCompletionRequest, ChatMessage
from kvpilot_engine.server.tools import (
    ToolContext,
    ToolSettings,
    render_messages,
    tool_constraint,
    tool_context,
)
from kvpilot_engine.tool_parsers import StreamingToolCalls, get_tool_parser

CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


def test_hermes():
    p = get_tool_parser("hermes")
    got = p.extract_tool_calls(f"Let me check.\n<tool_call>\n{CALL}\n</tool_call>")
    assert got.tools_called and got.content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in got.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    two = p.extract_tool_calls(f"<tool_call>{CALL}</tool_call><tool_call>{CALL}</tool_call>")
    assert len(two.tool_calls) == 2 and two.content is None
    assert len({c.id for c in two.tool_calls}) == 2
    # Unterminated at the end of the output (max_tokens or a stop string) still parses.
    assert p.extract_tool_calls(f"<tool_call>{CALL}").tools_called
    # Broken JSON is content, not lost.
    bad = p.extract_tool_calls("<tool_call>{nope</tool_call>")
    assert not bad.tools_called and bad.content == "<tool_call>{nope</tool_call>"
    assert p.extract_tool_calls("just text").content == "just text"


def test_llama3_json_and_mistral():
    got = get_tool_parser("llama3_json").extract_tool_calls(
        '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}'
    )
    assert [(c.name, c.arguments) for c in got.tool_calls] == [("a", '{"x": 1}'), ("b", "{}")]
    got = get_tool_parser("mistral").extract_tool_calls(
        'Sure. [TOOL_CALLS] [{"name": "a", "arguments": {"x": 2}}]'
    )
    assert got.content == "Sure." and got.tool_calls[0].arguments == '{"x": 2}'
    assert len(got.tool_calls[0].id) == 9
    with pytest.raises(ValueError, match="unknown tool call parser"):
        get_tool_parser("nope")


def test_streaming_holds_back_a_possible_marker():
    s = StreamingToolCalls(get_tool_parser("hermes"))
    sent = [s.feed(d) for d in ["Hello ", "wor", "ld <tool", "_call>", CALL, "</tool_call>"]]
    assert "".join(sent) == "Hello world "
    assert sent[2] == "ld "  # "<tool" held: it may be the start of the marker
    rest, calls = s.finish()
    assert rest == "" and calls[0].name == "get_weather"
    plain = StreamingToolCalls(get_tool_parser("hermes"))
    assert plain.feed("a <to") == "a "
    assert plain.finish() == ("<to", [])


def req(**kw) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}
    return ChatCompletionRequest.model_validate_json(json.dumps(body))


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def test_tool_modes_and_constraints():
    auto = ToolSettings(True, "hermes")
    assert tool_context(req(), auto).mode == "none"
    assert tool_context(req(tools=[TOOL]), auto).mode == "auto"
    assert tool_context(req(tools=[TOOL], tool_choice="none"), auto).mode == "none"
    named = tool_context(
        req(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "f"}}), auto
    )
    assert named.mode == "named" and tool_constraint(named).json == {"type": "object"}
    required = tool_constraint(tool_context(req(tools=[TOOL], tool_choice="required"), auto))
    assert required.json["minItems"] == 1
    # Auto without the server flags: a 400 that says which flags.
    with pytest.raises(Exception, match="--enable-auto-tool-choice"):
        tool_context(req(tools=[TOOL]), ToolSettings())


def test_fallback_tool_prompt_and_round_trip_rendering():
    msgs = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Weather?"),
        ChatMessage.model_validate(
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "f", "arguments": '{"city": "Paris"}'}}]}
        ),
        ChatMessage(role="tool", content="21C", tool_call_id="c1"),
    ]  # fmt: skip
    ctx = ToolContext("auto", [TOOL])
    out, extra = render_messages(msgs, ctx, "{% for m in messages %}{{ m.content }}{% endfor %}")
    assert extra == {}
    assert out[0]["role"] == "system" and "<tools>" in out[0]["content"]
    assert out[0]["content"].endswith("Be brief.")
    assert out[2]["content"] == (
        '<tool_call>\n{"name": "f", "arguments": {"city": "Paris"}}\n</tool_call>'
    )
    assert out[3] == {"role": "user", "content": "<tool_response>\n21C\n</tool_response>"}
    # A template that knows tools gets them as a variable, and the messages as they are.
    native, extra = render_messages(msgs, ctx, "{{ tools }}")
    assert extra == {"tools": [TOOL]} and native[3]["role"] == "tool"
    assert native[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
