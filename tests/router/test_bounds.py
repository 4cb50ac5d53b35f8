"""The router reads a body before admission, so it reads it with a limit: a real `kvpilot router`
(no engine needed: the refusal comes before routing)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.engine import free_port
from tests.support.router import routes, run_router, value

pytestmark = pytest.mark.slow


def test_bodies_past_the_limit_get_413_before_admission(tmp_path: Path) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    doc = routes({"stable": (100, [nowhere])})
    with run_router(tmp_path, doc, "--max-request-bytes", "1000", "--retries", "0") as router:
        url = f"{router.url}/v1/chat/completions"
        big = {"model": "m", "messages": [{"role": "user", "content": "x" * 1000}]}
        r = httpx.post(url, json=big, timeout=30)  # by its Content-Length
        assert r.status_code == 413
        assert r.json()["error"] == {
            "message": "the request body is larger than 1000 bytes",
            "type": "invalid_request_error",
            "param": None,
            "code": "request_too_large",
        }

        def chunked() -> Iterator[bytes]:  # no Content-Length: refused once past the limit
            for _ in range(20):
                yield b"x" * 100

        r = httpx.post(url, content=chunked(), timeout=30)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        # Within the limit, a request goes on to routing (here: to an engine that is not there).
        small = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(url, json=small, timeout=30).status_code == 502
        m = router.metrics()
        assert value(m, "kvpilot_router_rejected_total", reason="too_large") == 2
        assert value(m, "kvpilot_router_requests_total", revision="", code="413") == 2


def test_oversized_headers_and_too_many_connections_are_refused(tmp_path: Path) -> None:
    """Header bytes are bounded before they are parsed, connections past the limit get a 503
    at once rather than queueing without bound (an idle open connection counts), and headers
    that do not arrive in time get a 408."""
    import socket

    nowhere = f"http://127.0.0.1:{free_port()}"
    doc = routes({"stable": (100, [nowhere])})
    limits = ("--max-header-bytes", "2048", "--max-connections", "2", "--header-timeout", "2")
    with run_router(tmp_path, doc, *limits) as router:
        assert httpx.get(f"{router.url}/health", timeout=10).status_code == 200
        host, port = router.url.removeprefix("http://").split(":")
        # h11 bounds headers still incomplete past the limit: a slow client's trickle, or any
        # header block longer than one read brings (256 KiB for asyncio). The server answers 400
        # and closes, perhaps before the client is done sending (a reset); never a 200.
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            answer = b""
            try:
                head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"y" * 1_000_000
                sock.sendall(head + b"\r\n\r\n")
                answer = sock.recv(100)
            except (ConnectionResetError, BrokenPipeError):
                pass
            assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer
        idle = [socket.create_connection((host, int(port))) for _ in range(2)]
        try:
            time.sleep(0.3)  # accepted by the server
            assert httpx.get(f"{router.url}/health", timeout=10).status_code == 503
        finally:
            for s in idle:
                s.close()
        time.sleep(0.3)
        assert httpx.get(f"{router.url}/health", timeout=10).status_code == 200
        # Headers trickled past --header-timeout: 408 and closed (server/http.py's own tests
        # cover the rest; this is the flag reaching the router's server).
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 408 ")
