"""What a request must pass before the engine (server.guard), against a real `kvpilot serve` with
an API key, and a real `kvpilot router` in front of it holding that key for the engines."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.support.engine import MODEL, Server, metric, run_server, samples, scrape
from tests.support.kube import wait_for
from tests.support.router import routes, run_router, total, value

pytestmark = pytest.mark.slow

KEY = "engine-s3cret"
TINY = {"model": MODEL, "prompt": "Hello", "max_tokens": 1}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("keyed") / "serve.log"
    # As the operator runs engines that schedule by priority; one sequence at a time, so that a
    # queue forms on demand.
    flags = ["--scheduling-policy", "priority", "--trust-priority-header", "--max-num-seqs", "1"]
    with run_server(log, "--api-key", KEY, *flags) as s:
        yield s


def client(server: Server, key: str) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def test_the_api_key_guards_v1_and_leaves_probes_and_metrics_open(keyed: Server) -> None:
    for key in ("wrong", f"{KEY}x", KEY[:-1]):
        with pytest.raises(openai.AuthenticationError) as err:
            client(keyed, key).completions.create(model=MODEL, prompt="Hello", max_tokens=1)
        assert err.value.status_code == 401
        assert err.value.body["code"] == "invalid_api_key"  # type: ignore[index]
        with pytest.raises(openai.AuthenticationError):
            client(keyed, key).models.list()
    for headers in ({}, {"authorization": KEY}, {"authorization": f"Basic {KEY}"}):
        r = httpx.post(f"{keyed.url}/v1/chat/completions", json={}, headers=headers, timeout=10)
        assert r.status_code == 401, headers
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert r.headers["x-request-id"]  # refused inside the request-id middleware

    right = client(keyed, KEY)
    out = right.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
    assert out.usage is not None and out.usage.completion_tokens == 2
    chat = right.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert chat.choices[0].message.content is not None
    assert [m.id for m in right.models.list()] == [MODEL]

    for path in ("/health", "/ready", "/metrics"):  # the kubelet and Prometheus send no key
        assert httpx.get(keyed.url + path, timeout=10).status_code == 200


def test_the_router_sends_its_upstream_key_to_engines_and_shadows(
    keyed: Server, tmp_path: Path
) -> None:
    # The same engine as its own shadow, under another name (endpoint URLs are unique).
    other_name = keyed.url.replace("127.0.0.1", "localhost")
    doc = routes({"stable": (100, [keyed.url])}, shadow=("shadow", [other_name]))
    env = {"KVPILOT_API_KEY": "client-key", "KVPILOT_UPSTREAM_API_KEY": KEY}
    with run_router(tmp_path, doc, env=env) as router:
        user = OpenAI(base_url=f"{router.url}/v1", api_key="client-key", max_retries=0)
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
        for _ in range(3):
            out = user.completions.create(**body)  # type: ignore[call-overload]
            assert out.usage.completion_tokens == 2
        assert [m.id for m in user.models.list()] == [MODEL]
        # The client's own key is the router's, never forwarded: the engine would refuse it.
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=f"{router.url}/v1", api_key=KEY, max_retries=0).models.list()

        def shadow_results() -> dict[str, float]:
            m = router.metrics()
            return {
                r: value(m, "kvpilot_router_shadow_requests_total", revision="shadow", result=r)
                for r in ("ok", "error")
            }

        wait_for("the shadow's three answers", lambda: sum(shadow_results().values()) >= 3)
        assert shadow_results() == {"ok": 3, "error": 0}  # a 401 would count as an error
        assert total(router.metrics(), "kvpilot_router_upstream_errors_total") == 0
    # The engine saw only keyed requests: no 401 reached it from the router.
    assert total(scrape(keyed.url), "vllm:request_success_total") >= 6


# ---- bounds -------------------------------------------------------------------------------------
AUTH = {"authorization": f"Bearer {KEY}"}
LIMIT = 8 * 2**20  # the default --max-request-bytes


def test_bodies_past_the_limit_get_413_and_the_server_carries_on(keyed: Server) -> None:
    url = f"{keyed.url}/v1/completions"
    big = {"model": MODEL, "prompt": "x" * LIMIT, "max_tokens": 1}
    r = httpx.post(url, json=big, headers=AUTH, timeout=60)  # refused by its Content-Length
    assert r.status_code == 413, r.text
    assert r.json()["error"] == {
        "message": f"the request body is larger than {LIMIT} bytes",
        "type": "invalid_request_error",
        "param": None,
        "code": "request_too_large",
    }

    def chunked() -> Iterator[bytes]:  # no Content-Length: refused once past the limit
        yield b'{"model": "smollm2", "prompt": "'
        for _ in range(9):
            yield b"x" * 2**20
        yield b'"}'

    r = httpx.post(url, content=chunked(), headers=AUTH, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    ok = httpx.post(url, json=TINY, headers=AUTH, timeout=60)
    assert ok.status_code == 200, ok.text


def test_list_lengths_are_bounded(keyed: Server) -> None:
    c = client(keyed, KEY)
    hi = [{"role": "user", "content": "Hi"}]
    refused: list[tuple[str, dict[str, Any]]] = [
        ("stop", {"stop": ["a", "b", "c", "d", "e"]}),  # OpenAI's limit: 4
        ("stop_token_ids", {"extra_body": {"stop_token_ids": list(range(65))}}),
    ]
    for param, kw in refused:
        with pytest.raises(openai.BadRequestError) as err:
            c.completions.create(model=MODEL, prompt="Hi", max_tokens=1, **kw)
        assert err.value.body["param"] == param  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(model=MODEL, messages=hi, max_tokens=1, **kw)  # type: ignore[arg-type]
        assert err.value.body["param"] == param  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model=MODEL, messages=hi * 2049, max_tokens=1)  # type: ignore[arg-type]
    assert err.value.body["param"] == "messages"  # type: ignore[index]
    assert "at most 2048" in err.value.body["message"]  # type: ignore[index]

    # At the bounds: accepted (2048 messages are past this model's context, which is its own 400).
    out = c.completions.create(
        model=MODEL,
        prompt="Hi",
        max_tokens=1,
        stop=["a", "b", "c", "d"],
        extra_body={"stop_token_ids": list(range(64))},
    )
    assert len(out.choices) == 1
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model=MODEL, messages=hi * 2048, max_tokens=1)  # type: ignore[arg-type]
    assert err.value.body["code"] == "context_length_exceeded"  # type: ignore[index]


def test_health_answers_while_large_prompts_are_tokenised(keyed: Server) -> None:
    """Six ~4 MB prompts (900k tokens each, about 1.5 s of tokenising apiece) at once: templated
    and tokenised on worker threads, without the GIL, so /health answers meanwhile (on the event
    loop, tokenising them held /health up for 7 s)."""
    text = "The quick brown fox jumps over the lazy dog. " * 90_000
    bodies = [
        ("/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 1}),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": text}]}),
    ] * 3

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=keyed.url, headers=AUTH, timeout=300) as c:
            return await asyncio.gather(*(c.post(path, json=body) for path, body in bodies))

    # The prompts go from a thread of their own, so that sending them does not delay the probes.
    results: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: results.extend(asyncio.run(flood())))
    sender.start()
    worst, probes = 0.0, 0
    with httpx.Client(base_url=keyed.url, timeout=30) as probe:
        while sender.is_alive():
            t0 = time.perf_counter()
            assert probe.get("/health").status_code == 200
            worst = max(worst, time.perf_counter() - t0)
            probes += 1
            time.sleep(0.05)
    sender.join()
    assert len(results) == len(bodies)
    for r in results:  # all read, templated and tokenised, and then too long for this model
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert probes >= 5, "the prompts were handled too fast to tell"
    assert worst < 1.0, f"/health took {worst:.2f}s while prompts were tokenised"


# ---- priority -----------------------------------------------------------------------------------
def test_a_client_cannot_set_its_priority(keyed: Server) -> None:
    c = client(keyed, KEY)
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model=MODEL, prompt="Hi", max_tokens=1, extra_body={"priority": -5})
    assert err.value.body["param"] == "priority"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=1,
            extra_body={"priority": 3},
        )
    assert err.value.body["param"] == "priority"  # type: ignore[index]
    # The default (0) is what vLLM clients send when they mean nothing by it.
    c.completions.create(model=MODEL, prompt="Hi", max_tokens=1, extra_body={"priority": 0})
    r = httpx.post(
        f"{keyed.url}/v1/completions",
        json=TINY,
        headers={**AUTH, "x-kvpilot-priority": "high"},
        timeout=60,
    )
    assert r.status_code == 400 and "x-kvpilot-priority" in r.json()["error"]["message"]


def test_priority_follows_the_callers_key_tier_not_its_headers(
    keyed: Server, tmp_path: Path
) -> None:
    """Behind a router with two tiers: a batch caller that forges X-KVPilot-Priority: -100 still
    waits behind a gold caller who came after it (the engine runs one sequence at a time). The
    gold request preempts the running batch one, which then resumes ahead of the forged one
    (same tier, earlier): a forged header that counted would have preempted first."""
    env = {"KVPILOT_PRIORITY_KEYS": "10=batch-key,-10=gold-key", "KVPILOT_UPSTREAM_API_KEY": KEY}
    with run_router(tmp_path, routes({"stable": (100, [keyed.url])}), env=env) as router:

        async def main() -> list[str]:
            order: list[str] = []
            async with (
                httpx.AsyncClient(base_url=router.url, timeout=300) as c,
                httpx.AsyncClient(base_url=keyed.url, timeout=30) as engine,
            ):

                async def until(name: str, value: float) -> None:
                    for _ in range(600):
                        m = samples((await engine.get("/metrics")).text)
                        if metric(m, name) >= value:
                            return
                        await asyncio.sleep(0.05)
                    raise AssertionError(f"{name} never reached {value}")

                async def call(label: str, key: str, tokens: int, **headers: str) -> None:
                    body = {
                        "model": MODEL,
                        "prompt": "Count: one two three",
                        "max_tokens": tokens,
                        "ignore_eos": True,
                    }
                    auth = {"authorization": f"Bearer {key}", **headers}
                    r = await c.post("/v1/completions", json=body, headers=auth)
                    assert r.status_code == 200, r.text
                    order.append(label)

                occupant = asyncio.create_task(call("occupant", "batch-key", 48))
                await until("vllm:num_requests_running", 1)
                forged = asyncio.create_task(
                    call("forged", "batch-key", 4, **{"x-kvpilot-priority": "-100"})
                )
                await until("vllm:num_requests_waiting", 1)
                gold = asyncio.create_task(call("gold", "gold-key", 4))
                await until("vllm:num_requests_waiting", 2)
                await asyncio.gather(occupant, forged, gold)
            return order

        assert asyncio.run(main()) == ["gold", "occupant", "forged"]
        # Unknown keys are still refused; the tier keys are API keys of their own.
        r = httpx.post(f"{router.url}/v1/completions", json=TINY, timeout=30)
        assert r.status_code == 401
        assert httpx.get(f"{router.url}/router/state", timeout=10).status_code == 401
        state = httpx.get(
            f"{router.url}/router/state", headers={"authorization": "Bearer gold-key"}, timeout=10
        )
        assert state.status_code == 200
