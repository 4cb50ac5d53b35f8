"""The router's prefix key for chat requests with tools: the engine renders the tool list ahead of
the messages, so the key starts with it (unless tool_choice is none, when they are not shown)."""

from __future__ import annotations

import json

from kvpilot_operator.router.proxy import parse_request

MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
OTHER = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


def key(**body: object) -> str:
    return parse_request(json.dumps({"model": "m", "messages": MESSAGES, **body}).encode()).prompt


def test_tools_lead_the_prefix_key() -> None:
    plain = key()
    with_tool = key(tools=[TOOL])
    assert with_tool.startswith("tools:") and with_tool.endswith(plain)
    assert key(tools=[TOOL], tool_choice="required") == with_tool
    assert key(tools=[OTHER]) != with_tool
    assert key(tools=[TOOL], tool_choice="none") == plain
    assert key(tools=[]) == plain
