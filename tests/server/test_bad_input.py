"""Bad input: every case is a 4xx with an OpenAI error body, and the server keeps serving with
nothing left in its KV cache."""

from __future__ import annotations

import json

import httpx
import pytest
from kvpilot_engine.server.protocol import MAX_N

from tests.support.engine import MAX_MODEL_LEN, MODEL, wait_idle

OK_COMPLETION = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
OK_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
LONG_PROMPT = "hello " * (MAX_MODEL_LEN + 50)


def completion(**changes: object) -> dict[str, object]:
    return {**OK_COMPLETION, **changes}


def chat(**changes: object) -> dict[str, object]:
    return {**OK_CHAT, **changes}


def without(body: dict[str, object], key: str) -> dict[str, object]:
    return {k: v for k, v in body.items() if k != key}


C, CH = "/v1/completions", "/v1/chat/completions"
# (id, path, body: bytes or a JSON-able dict, expected status, expected error.param or None)
CASES: list[tuple[str, str, bytes | dict[str, object], int, str | None]] = [
    ("malformed-json", C, b'{"model": "smollm2", "prompt": ', 400, None),
    ("not-json", C, b"prompt=hello", 400, None),
    ("empty-body", C, b"", 400, None),
    ("json-array-body", C, b"[1, 2]", 400, None),
    ("invalid-utf8", C, b'{"model": "smollm2", "prompt": "\xff\xfe\xfd"}', 400, None),
    ("invalid-utf8-chat", CH, b'{"model":"smollm2","messages":[{"role":"user","content":"\xc3"}]}',
     400, None),
    ("missing-model", C, without(OK_COMPLETION, "model"), 400, "model"),
    ("missing-prompt", C, without(OK_COMPLETION, "prompt"), 400, "prompt"),
    ("unknown-model", C, completion(model="gpt-4"), 404, "model"),
    ("unknown-model-chat", CH, chat(model="nope"), 404, "model"),
    # Unknown fields are ignored (test_structured_outputs); known but not implemented are a 400.
    ("not-implemented-field", C, completion(use_beam_search=True), 400, "use_beam_search"),
    ("not-implemented-field-chat", CH, chat(audio={"voice": "alloy"}), 400, "audio"),
    ("prompt-wrong-type", C, completion(prompt=42), 400, "prompt"),
    ("max-tokens-string", C, completion(max_tokens="ten"), 400, "max_tokens"),
    ("max-tokens-float", C, completion(max_tokens=2.5), 400, "max_tokens"),
    ("max-tokens-negative", C, completion(max_tokens=-5), 400, "max_tokens"),
    ("max-tokens-zero", C, completion(max_tokens=0), 400, "max_tokens"),
    ("max-tokens-huge", C, completion(max_tokens=10**9), 400, "max_tokens"),
    ("max-tokens-huge-chat", CH, chat(max_tokens=10**6), 400, "max_tokens"),
    ("temperature-negative", C, completion(temperature=-0.5), 400, "temperature"),
    ("temperature-too-high", C, completion(temperature=7.0), 400, "temperature"),
    ("temperature-string", C, completion(temperature="hot"), 400, "temperature"),
    ("top-p-zero", C, completion(top_p=0.0), 400, "top_p"),
    ("top-p-above-one", C, completion(top_p=1.5), 400, "top_p"),
    ("n-zero", C, completion(n=0), 400, "n"),
    ("n-huge", C, completion(n=100000), 400, "n"),
    ("stream-not-bool", C, completion(stream="yes"), 400, "stream"),
    ("logprobs-too-many", C, completion(logprobs=1000), 400, "logprobs"),
    ("top-logprobs-without-logprobs", CH, chat(top_logprobs=2), 400, "top_logprobs"),
    ("empty-prompt", C, completion(prompt=""), 400, "prompt"),
    ("empty-token-prompt", C, completion(prompt=[]), 400, "prompt"),
    ("token-id-out-of-vocab", C, completion(prompt=[1, 10**9]), 400, "prompt"),
    ("negative-token-id", C, completion(prompt=[-1]), 400, "prompt"),
    ("one-of-several-prompts-empty", C, completion(prompt=["a", ""]), 400, "prompt"),
    ("prompts-mixed-types", C, completion(prompt=["a", [1, 2]]), 400, "prompt"),
    ("one-of-several-prompts-past-context", C, completion(prompt=["Hello", LONG_PROMPT]), 400,
     "prompt"),
    ("one-of-several-token-prompts-out-of-vocab", C, completion(prompt=[[1, 2], [10**9]]), 400,
     "prompt"),
    ("too-many-prompts", C, completion(prompt=["a"] * (MAX_N + 1)), 400, "prompt"),
    ("too-many-prompts-times-n", C, completion(prompt=["a", "b", "c"], n=MAX_N // 2), 400,
     "prompt"),
    ("prompt-past-context", C, completion(prompt=LONG_PROMPT), 400, "prompt"),
    ("chat-past-context", CH, chat(messages=[{"role": "user", "content": LONG_PROMPT}]), 400,
     "messages"),
    ("empty-messages", CH, chat(messages=[]), 400, "messages"),
    ("messages-not-list", CH, chat(messages="hi"), 400, "messages"),
    ("message-bad-role", CH, chat(messages=[{"role": "wizard", "content": "hi"}]), 400,
     "messages"),
    ("message-missing-content", CH, chat(messages=[{"role": "user"}]), 400, "messages"),
    ("stop-wrong-type", C, completion(stop=5), 400, "stop"),
    ("stop-empty-string", C, completion(stop=[""]), 400, None),
    ("min-tokens-over-max", C, completion(min_tokens=10, max_tokens=2), 400, None),
    ("echo-with-logprobs", C, completion(echo=True, logprobs=1), 400, "echo"),
    ("suffix", C, completion(suffix="}"), 400, "suffix"),
    ("best-of-below-n", C, completion(n=2, best_of=1), 400, "best_of"),
    ("best-of-above-n", C, completion(best_of=3), 400, "best_of"),
    ("best-of-zero", C, completion(best_of=0), 400, "best_of"),
    ("penalty-out-of-range", C, completion(frequency_penalty=9.0), 400, "frequency_penalty"),
    ("presence-penalty-too-low", C, completion(presence_penalty=-2.5), 400, "presence_penalty"),
    ("presence-penalty-string", C, completion(presence_penalty="1"), 400, "presence_penalty"),
    ("frequency-penalty-chat", CH, chat(frequency_penalty=2.5), 400, "frequency_penalty"),
    ("repetition-penalty-zero", C, completion(repetition_penalty=0), 400, "repetition_penalty"),
    ("repetition-penalty-negative-chat", CH, chat(repetition_penalty=-1.0), 400,
     "repetition_penalty"),
    ("repetition-penalty-infinite", C, b'{"model": "smollm2", "prompt": "Hi", '
     b'"repetition_penalty": Infinity}', 400, "repetition_penalty"),
    ("logit-bias-key-not-id", C, completion(logit_bias={"apple": 5}), 400, "logit_bias"),
    ("logit-bias-key-negative", C, completion(logit_bias={"-3": 5}), 400, "logit_bias"),
    ("logit-bias-key-unicode-digit", C, completion(logit_bias={"\u00b2": 5}), 400, "logit_bias"),
    ("logit-bias-key-out-of-vocab", C, completion(logit_bias={"99999999": 5}), 400, "logit_bias"),
    ("logit-bias-value-too-big", C, completion(logit_bias={"5": 101}), 400, "logit_bias"),
    ("logit-bias-value-too-small-chat", CH, chat(logit_bias={"5": -100.5}), 400, "logit_bias"),
    ("logit-bias-value-string", C, completion(logit_bias={"5": "high"}), 400, "logit_bias"),
    ("logit-bias-not-object", CH, chat(logit_bias=[1, 2]), 400, "logit_bias"),
    ("logit-bias-out-of-vocab-chat", CH, chat(logit_bias={"49152": 1}), 400, "logit_bias"),
    ("stream-options-unknown", C, completion(stream=True, stream_options={"x": 1}), 400,
     "stream_options"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "status", "param"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_bad_request(
    base_url: str, path: str, body: bytes | dict[str, object], status: int, param: str | None
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(
        base_url + path, content=content, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param, err


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (completion(suffix="}"), "suffix is not supported"),
        (completion(n=3, best_of=2), "best_of must be at least n"),
        (completion(echo=True, logprobs=0), "echo with logprobs is not supported"),
        (completion(prompt=["a"] * MAX_N, n=2), f"at most {MAX_N}"),
        (completion(prompt=["a", ""]), "prompt 1 must not be empty"),
    ],
    ids=["suffix", "best-of", "echo-logprobs", "choices", "empty-prompt"],
)
def test_refusals_say_why(base_url: str, body: dict[str, object], words: str) -> None:
    r = httpx.post(f"{base_url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_unknown_route_and_method(base_url: str) -> None:
    for r in (httpx.get(f"{base_url}/v2/nothing"), httpx.get(f"{base_url}/v1/completions")):
        assert r.status_code in (404, 405)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_still_serving_and_nothing_leaked(base_url: str) -> None:
    assert len(CASES) >= 25
    r = httpx.post(f"{base_url}/v1/completions", json=OK_COMPLETION, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
    assert httpx.get(f"{base_url}/health").status_code == 200
    wait_idle(base_url)
