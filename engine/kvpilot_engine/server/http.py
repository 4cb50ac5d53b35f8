"""The HTTP/1.1 protocol the engine and the router serve on: uvicorn's h11 with a deadline for a
request's headers.

uvicorn bounds the header bytes (`--max-header-bytes`) and the connections
(`--max-connections`) but not the time a client takes to send its headers: a client that
trickles a byte every few seconds, or opens a connection and says nothing, holds a connection
slot for as long as it likes, and a few thousand of them take the server out (slowloris). Here a
connection must complete each request's line and headers within `--header-timeout` seconds of
connecting, or of the previous response: past it the server answers 408 (when some of a request
has come) and closes. A request whose headers are in is never cut by this: its body and its
response (a long stream) run as long as they need. Torch-free: the router uses it too.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_HEADER_TIMEOUT = 30.0  # nginx's client_header_timeout is 60 s; clients send in one write
_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 36\r\nconnection: close\r\n\r\nrequest headers not received in time"
)


class HeaderDeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose next request's headers are late."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    _deadline: asyncio.TimerHandle | None = None
    _partial: bool = False  # bytes of the next request have come, its headers not all

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._serving():
            self._disarm()
        else:
            self._partial = True

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request already buffered
        if not self.transport.is_closing() and not self._serving():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _serving(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._partial = False
        self._deadline = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_late(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self._serving():
            return
        if self._partial:
            self.transport.write(_REQUEST_TIMEOUT)
        self.transport.close()


def h11_with_header_timeout(seconds: float) -> type[HeaderDeadlineH11Protocol]:
    """The protocol class to pass as uvicorn's `http=`, with this deadline."""
    if seconds <= 0:
        raise ValueError(f"the header timeout must be positive, got {seconds}")
    return type("H11WithHeaderTimeout", (HeaderDeadlineH11Protocol,), {"header_timeout": seconds})
