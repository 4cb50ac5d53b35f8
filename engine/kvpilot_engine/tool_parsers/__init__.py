"""Tool-call parsers: a model's text output -> OpenAI tool calls, by the model family's format.

Chosen with `kvpilot serve --tool-call-parser NAME` (vLLM's flag and names):

- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Hermes, Qwen2.5,
  and the format kvpilot's own tool prompt asks for when a chat template has no tool support);
- `llama3_json`: a JSON object `{"name": ..., "parameters": {...}}` (several separated by `;`),
  optionally after `<|python_tag|>` (Llama 3.1+);
- `mistral`: `[TOOL_CALLS]` followed by a JSON array of `{"name", "arguments"}` objects.

Each parser gives the calls in a whole output (`extract_tool_calls`) and splits a stream
(`StreamingToolCalls`): text before a call's opening marker streams as content, the call itself
is held until it is complete and then sent as one tool-call delta.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass
class ParsedToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass
class ExtractedToolCalls:
    tools_called: bool
    tool_calls: list[ParsedToolCall]
    content: str | None  # the text outside the calls, None when there is none


class ToolParser:
    name: ClassVar[str]
    # Where a call starts in the text; what precedes the first is content.
    start_markers: ClassVar[tuple[str, ...]]

    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        start = self._first_marker(text)
        if start is None:
            return ExtractedToolCalls(False, [], text)
        try:
            calls = self._parse_calls(text[start:])
        except (ValueError, KeyError, TypeError, AttributeError):
            # Not a well-formed call: give the text back as it is rather than lose it.
            return ExtractedToolCalls(False, [], text)
        if not calls:
            return ExtractedToolCalls(False, [], text)
        content = text[:start].strip()
        return ExtractedToolCalls(True, calls, content or None)

    def _first_marker(self, text: str) -> int | None:
        found = [i for i in (text.find(m) for m in self.start_markers) if i != -1]
        return min(found) if found else None

    def _parse_calls(self, text: str) -> list[ParsedToolCall]:
        raise NotImplementedError


def _call(obj: Any, args_keys: tuple[str, ...] = ("arguments",)) -> ParsedToolCall:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ValueError("a tool call is an object with a name")
    args: Any = {}
    for key in args_keys:
        if key in obj:
            args = obj[key]
            break
    if isinstance(args, str):  # some models write the arguments as JSON text already
        args = json.loads(args)
    return ParsedToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class HermesToolParser(ToolParser):
    name = "hermes"
    start_markers = ("<tool_call>",)
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def _parse_calls(self, text: str) -> list[ParsedToolCall]:
        return [_call(json.loads(m)) for m in self._BLOCK.findall(text) if m.strip()]


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    start_markers = ("<|python_tag|>", '{"name"', '{ "name"')

    def _parse_calls(self, text: str) -> list[ParsedToolCall]:
        text = text.removeprefix("<|python_tag|>").strip()
        decoder = json.JSONDecoder()
        calls, pos = [], 0
        while pos < len(text):
            obj, end = decoder.raw_decode(text, pos)
            calls.append(_call(obj, ("parameters", "arguments")))
            pos = end
            while pos < len(text) and text[pos] in " \n\t;":
                pos += 1
        return calls


class MistralToolParser(ToolParser):
    name = "mistral"
    start_markers = ("[TOOL_CALLS]",)

    def _parse_calls(self, text: str) -> list[ParsedToolCall]:
        body = text.removeprefix("[TOOL_CALLS]").strip()
        obj, _ = json.JSONDecoder().raw_decode(body)
        objs = obj if isinstance(obj, list) else [obj]
        # Mistral's templates want 9-character alphanumeric call ids.
        return [
            ParsedToolCall(c.name, c.arguments, id=uuid.uuid4().hex[:9])
            for c in (_call(o) for o in objs)
        ]


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesToolParser, Llama3JsonToolParser, MistralToolParser)
}


def get_tool_parser(name: str) -> ToolParser:
    try:
        return TOOL_PARSERS[name]()
    except KeyError:
        raise ValueError(
            f"unknown tool call parser {name!r}; choose one of {', '.join(TOOL_PARSERS)}"
        ) from None


class StreamingToolCalls:
    """One choice's stream through a parser: `feed` returns the content that can be sent now
    (text that might be the start of a marker is held back); `finish` parses what was held."""

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.text = ""
        self.sent = 0  # characters of self.text already sent as content
        self.in_call = False

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.in_call:
            return ""
        start = self.parser._first_marker(self.text)
        if start is not None:
            self.in_call = True
            out, self.sent = self.text[self.sent : start], start
            return out
        # Hold back a tail that could still grow into a marker.
        hold = max(
            (k for m in self.parser.start_markers for k in range(1, len(m))
             if self.text.endswith(m[:k])),
            default=0,
        )  # fmt: skip
        end = len(self.text) - hold
        out, self.sent = self.text[self.sent : max(end, self.sent)], max(end, self.sent)
        return out

    def finish(self) -> tuple[str, list[ParsedToolCall]]:
        """The content still held back, and the calls (none if the held text does not parse)."""
        rest = self.text[self.sent :]
        if not self.in_call:
            return rest, []
        parsed = self.parser.extract_tool_calls(rest)
        if not parsed.tools_called:
            return rest, []
        return "", parsed.tool_calls
