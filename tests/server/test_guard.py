"""What a request must pass before the engine (server.guard), against a real `kvpilot serve` with
an API key, and a real `kvpilot router` in front of it holding that key for the engines."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from tests.support.engine import MODEL, Server, run_server, scrape
from tests.support.kube import wait_for
from tests.support.router import routes, run_router, total, value

pytestmark = pytest.mark.slow

KEY = "engine-s3cret"
TINY = {"model": MODEL, "prompt": "Hello", "max_tokens": 1}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("keyed") / "serve.log"
    with run_server(log, "--api-key", KEY, "--max-num-seqs", "8") as s:
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
