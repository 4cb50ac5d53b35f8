"""The header deadline of the engine's and the router's HTTP protocol (server/http.py), on a real
uvicorn server on loopback (in this process): late headers get 408 and a closed connection, a
silent connection is closed, and nothing cuts a request whose headers are in, however long its
response runs."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from kvpilot_engine.server.http import h11_with_header_timeout

from tests.support.engine import free_port

TIMEOUT = 0.5


async def app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    slow = scope["path"] == "/slow"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x", b"y")]})
    for _ in range(4 if slow else 1):
        if slow:
            await asyncio.sleep(TIMEOUT)  # the response outlives the header deadline
        await send({"type": "http.response.body", "body": b"ok", "more_body": True})
    await send({"type": "http.response.body", "body": b""})


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, int]]:
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        http=h11_with_header_timeout(TIMEOUT),
        log_config=None,
        timeout_keep_alive=30,  # longer than the deadline: the deadline must act on its own
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    yield "127.0.0.1", port
    srv.should_exit = True
    thread.join(10)


def read_response(sock: socket.socket) -> bytes:
    """One whole response (chunked: it ends with the empty chunk), however the reads split it."""
    data = b""
    while not data.endswith(b"0\r\n\r\n"):
        chunk = sock.recv(4096)
        assert chunk, f"closed mid-response: {data!r}"
        data += chunk
    return data


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_headers_trickled_past_the_deadline_get_408(server: tuple[str, int]) -> None:
    with socket.create_connection(server, timeout=10) as sock:
        start = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\n")
        time.sleep(TIMEOUT / 2)
        sock.sendall(b"Host: x\r\n")  # more bytes do not restart the clock
        answer = read_all(sock)
        took = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"connection: close" in answer
    assert TIMEOUT * 0.8 < took < TIMEOUT * 6, took


def test_a_silent_connection_is_closed(server: tuple[str, int]) -> None:
    with socket.create_connection(server, timeout=10) as sock:
        start = time.monotonic()
        assert read_all(sock) == b""  # closed, nothing said: no request began
        assert time.monotonic() - start < TIMEOUT * 6


def test_a_response_longer_than_the_deadline_is_not_cut(server: tuple[str, int]) -> None:
    with socket.create_connection(server, timeout=10) as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert answer.count(b"ok") == 4


def test_the_deadline_rearms_for_the_next_request_on_a_connection(
    server: tuple[str, int],
) -> None:
    with socket.create_connection(server, timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        first = read_response(sock)
        assert first.startswith(b"HTTP/1.1 200 "), first
        # Keep-alive: a second request in time is served...
        time.sleep(TIMEOUT / 3)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")
        # ...and one whose headers stall is cut, though keep-alive (30 s) would wait.
        sock.sendall(b"GET / HTTP/1.1\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 408 ")


def test_the_deadline_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        h11_with_header_timeout(0)
