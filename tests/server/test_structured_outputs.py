"""Structured outputs and tool calls through the official openai client against one real
`kvpilot serve` (SmolLM2, Hermes tool parser, auto tool choice on), shared by the module.

Oracles: jsonschema validates every JSON answer against the schema that was sent; tool-call
arguments are validated against the tool's parameters; regex answers are re.fullmatch'ed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from tests.support.engine import MODEL, Server, run_server

pytestmark = pytest.mark.slow

S = {"type": "string", "maxLength": 12}


def obj(props: dict, required: list[str] | None = None) -> dict:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        "additionalProperties": False,
    }


# A dozen schemas, from one field to nested arrays of referenced objects.
SCHEMAS: list[tuple[str, dict]] = [
    ("one string", obj({"name": S})),
    ("bounded integer", obj({"age": {"type": "integer", "minimum": 0, "maximum": 120}})),
    ("boolean and enum", obj({"ok": {"type": "boolean"}, "color": {"enum": ["red", "blue"]}})),
    ("pattern", obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}})),
    ("array of strings", obj({"tags": {"type": "array", "items": S, "minItems": 1,
                                       "maxItems": 3}})),
    ("bounded number", obj({"price": {"type": "number", "exclusiveMinimum": 0,
                                      "maximum": 100}})),
    ("nested object", obj({"name": S, "address": obj({"city": S, "zip": {
        "type": "string", "pattern": "^[0-9]{5}$"}})})),
    ("nullable", obj({"nick": {"anyOf": [S, {"type": "null"}]}, "n": {"type": "integer",
                      "minimum": 1, "maximum": 9}})),
    ("optional fields", obj({"a": S, "b": {"type": "integer", "minimum": 0, "maximum": 99},
                             "c": {"type": "boolean"}}, required=["a"])),
    ("array of objects", obj({"items": {"type": "array", "maxItems": 2, "items": obj(
        {"sku": S, "qty": {"type": "integer", "minimum": 1, "maximum": 9}})}})),
    ("refs", {"$defs": {"p": obj({"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                  "y": {"type": "integer", "minimum": -9, "maximum": 9}})},
              **obj({"from": {"$ref": "#/$defs/p"}, "to": {"$ref": "#/$defs/p"}})}),
    ("deep mix", obj({"user": obj({"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                   "roles": {"type": "array", "maxItems": 2,
                                             "items": {"enum": ["admin", "dev", "ops"]}}}),
                      "events": {"type": "array", "maxItems": 2, "items": obj(
                          {"kind": {"enum": ["push", "pull"]}, "when": {
                              "type": "string", "pattern": "^2026-[01][0-9]-[0-3][0-9]$"},
                           "meta": {"anyOf": [obj({"ref": S}), {"type": "null"}]}})}})),
]  # fmt: skip

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": obj(
            {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["c", "f"]}}
        ),
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a timezone",
        "parameters": obj({"tz": {"type": "string", "maxLength": 20}}),
    },
}
TOOL_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("so") / "serve.log"
    with run_server(
        log, "--max-num-seqs", "16", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300)


def ask_json(client: openai.OpenAI, name: str, schema: dict, temperature: float) -> str:
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": f"Reply with JSON: an example of {name}."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema, "strict": True},
        },
        temperature=temperature,
        seed=3,
        max_tokens=300,
    )
    c = r.choices[0]
    assert c.finish_reason == "stop", (name, c.message.content)
    return c.message.content or ""


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_dozen_json_schemas_parse_and_validate(client: openai.OpenAI, temperature: float):
    with ThreadPoolExecutor(len(SCHEMAS)) as pool:
        answers = list(pool.map(lambda s: ask_json(client, *s, temperature), SCHEMAS))
    for (_, schema), text in zip(SCHEMAS, answers, strict=True):
        jsonschema.validate(json.loads(text), schema)


def test_other_constraints(client: openai.OpenAI, server: Server):
    chat = client.chat.completions.create
    r = chat(model=MODEL, messages=ASK, response_format={"type": "json_object"}, max_tokens=200)
    assert isinstance(json.loads(r.choices[0].message.content or ""), dict)
    r = chat(model=MODEL, messages=ASK, extra_body={"guided_choice": ["sunny", "rainy"]})
    assert r.choices[0].message.content in ("sunny", "rainy")
    r = client.completions.create(
        model=MODEL, prompt="Phone:", max_tokens=30, temperature=0.8,
        extra_body={"guided_regex": r"\d{3}-\d{4}"},
    )  # fmt: skip
    assert re.fullmatch(r"\d{3}-\d{4}", r.choices[0].text)
    r = chat(
        model=MODEL, messages=ASK, max_tokens=20,
        extra_body={"structured_outputs": {"grammar": 'root ::= "yes" | "no"'}},
    )  # fmt: skip
    assert r.choices[0].message.content in ("yes", "no")
    # Streaming: the deltas put together are the constrained answer.
    schema = SCHEMAS[6][1]
    text = "".join(
        ch.choices[0].delta.content or ""
        for ch in chat(
            model=MODEL, messages=ASK, stream=True, max_tokens=200,
            response_format={"type": "json_schema", "json_schema": {"name": "x",
                                                                    "schema": schema}},
        )
        if ch.choices
    )  # fmt: skip
    jsonschema.validate(json.loads(text), schema)
    # An unknown field is ignored, and said so in the log.
    r = chat(model=MODEL, messages=ASK, max_tokens=2, extra_body={"frobnicate": 1})
    assert r.choices[0].message.content is not None
    assert "ignored_unknown_fields" in Path(server.log_path).read_text()


def check_calls(calls, names: set[str]) -> None:
    assert calls, "no tool calls"
    for c in calls:
        assert c.type == "function" and c.id and c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), TOOL_SCHEMAS[c.function.name])


def stream_calls(client: openai.OpenAI, **kw):
    """Tool calls assembled from a stream as clients do (by index), and the finish reason."""
    calls: dict[int, dict] = {}
    finish = None
    for ch in client.chat.completions.create(model=MODEL, stream=True, **kw):
        if not ch.choices:
            continue
        d = ch.choices[0]
        finish = d.finish_reason or finish
        for tc in d.delta.tool_calls or []:
            c = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            c["id"] += tc.id or ""
            c["name"] += tc.function.name or ""
            c["arguments"] += tc.function.arguments or ""
    return calls, finish


@pytest.mark.parametrize("choice", ["required", "named"])
def test_required_and_named_tool_calls_always_parse(client: openai.OpenAI, choice: str):
    tool_choice = (
        "required" if choice == "required"
        else {"type": "function", "function": {"name": "get_time"}}
    )  # fmt: skip
    names = {"get_weather", "get_time"} if choice == "required" else {"get_time"}
    kw = dict(messages=ASK, tools=[WEATHER, TIME], tool_choice=tool_choice, max_tokens=200)

    def one(i: int) -> None:
        r = client.chat.completions.create(model=MODEL, temperature=0.8, seed=i, **kw)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        check_calls(c.message.tool_calls, names)
        calls, finish = stream_calls(client, temperature=0.8, seed=100 + i, **kw)
        assert finish == "tool_calls"
        for call in calls.values():
            assert call["id"] and call["name"] in names
            jsonschema.validate(json.loads(call["arguments"]), TOOL_SCHEMAS[call["name"]])

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(4)))


def test_auto_round_trip_through_a_tool_message(client: openai.OpenAI):
    # The model's turn: a call (forced here, so the test does not hang on the model's mood).
    first = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=100,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )  # fmt: skip
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),  # as agent frameworks send it
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21, "sky": "clear"}'},
    ]
    # Auto: the model may call again or answer; either way the answer is well formed.
    for stream in (False, True):
        if stream:
            calls, finish = stream_calls(client, messages=messages, tools=[WEATHER],
                                         max_tokens=60)  # fmt: skip
            assert finish in ("stop", "length", "tool_calls")
            for c in calls.values():
                jsonschema.validate(json.loads(c["arguments"]), TOOL_SCHEMAS[c["name"]])
            continue
        r = client.chat.completions.create(
            model=MODEL, messages=messages, tools=[WEATHER], tool_choice="auto", max_tokens=60
        )
        c = r.choices[0]
        if c.message.tool_calls:
            check_calls(c.message.tool_calls, {"get_weather"})
        else:
            assert c.message.content and "<tool_call>" not in c.message.content


BAD: list[tuple[str, dict, str]] = [
    ("invalid schema", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "strin"}}}}, "response_format"),
    ("unsupported keyword", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}}, "response_format"),
    ("schema missing", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x"}}}, "response_format"),
    ("bad regex", {"guided_regex": "[0-9]+("}, "guided_regex"),
    ("bad grammar", {"guided_grammar": "root ::= b"}, "guided_grammar"),
    ("two constraints", {"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ("duplicate tools", {"tools": [WEATHER, WEATHER]}, "tools"),
    ("absent tool", {"tools": [WEATHER], "tool_choice": {"type": "function",
                                                         "function": {"name": "nope"}}},
     "tool_choice"),
    ("tool_choice without tools", {"tool_choice": "required"}, "tool_choice"),
    ("bad tool parameters", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "not": {}}}}], "tool_choice": "required"},
     "tools"),
    ("not implemented", {"audio": {"voice": "alloy", "format": "mp3"}}, "audio"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "param"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_a_400_naming_the_param(server: Server, body: dict, param: str):
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": MODEL, "messages": ASK, "max_tokens": 5, **body},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err


def test_through_the_router(server: Server, tmp_path: Path):
    """The router passes these bodies through untouched and streams tool-call deltas."""
    from tests.support.router import routes, run_router

    with run_router(tmp_path, routes({"stable": (100, [server.url])})) as router:
        via = openai.OpenAI(base_url=f"{router.url}/v1", api_key="none", max_retries=0,
                            timeout=300)  # fmt: skip
        schema = SCHEMAS[9][1]
        text = ask_json(via, SCHEMAS[9][0], schema, 0.8)
        jsonschema.validate(json.loads(text), schema)
        calls, finish = stream_calls(
            via, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=200,
            temperature=0.8,
        )  # fmt: skip
        assert finish == "tool_calls" and calls
        for c in calls.values():
            jsonschema.validate(json.loads(c["arguments"]), TOOL_SCHEMAS[c["name"]])
        with pytest.raises(openai.BadRequestError) as err:
            via.chat.completions.create(
                model=MODEL, messages=ASK, tools=[WEATHER, WEATHER], max_tokens=2
            )
        assert err.value.body["param"] == "tools"
