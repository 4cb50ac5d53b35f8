"""What a request must pass before the engine sees it: the API key, the size of its body, and the
one place its scheduling priority may come from.

- The API key (`kvpilot serve --api-key`, as vLLM's; or KVPILOT_API_KEY) guards every /v1/* route;
  /health, /ready and /metrics stay open for the kubelet's probes and Prometheus. In a cluster the
  engine's key is the router's, from the same Secret, so a pod on the network cannot go around
  the router.
- Bodies are read with a limit (`--max-request-bytes`): past it, 413 before the rest is read.
- Priority: a client must not be able to jump the queue, so the body's `priority` (vLLM honours
  it) is refused unless it is 0; with `--trust-priority-header` the engine takes the priority from
  X-KVPilot-Priority, which the router sets from the caller's API key and drops from clients.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from kvpilot_engine.server.errors import APIError, error_response
from kvpilot_engine.server.http import DEFAULT_HEADER_TIMEOUT

API_KEY_ENV = "KVPILOT_API_KEY"
PRIORITY_HEADER = "x-kvpilot-priority"
# Far above any prompt a served model can take (128k tokens of text is about 0.5 MiB), far below
# what would hurt a pod's memory to buffer.
DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20


DEFAULT_MAX_CONNECTIONS = 2048
DEFAULT_MAX_HEADER_BYTES = 64 * 2**10


@dataclass(frozen=True)
class GuardSettings:
    api_key: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    trust_priority_header: bool = False
    # Connections (and requests) served at once; beyond, 503 at once instead of a pile-up.
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    # A request line and headers still incomplete past this are refused (400): a client trickling
    # headers, or a block longer than one read (h11's bound on an incomplete event).
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    # Seconds a connection has to complete each request's line and headers (server/http.py).
    header_timeout: float = DEFAULT_HEADER_TIMEOUT


def bearer_matches(authorization: bytes, key: bytes) -> bool:
    scheme, _, token = authorization.partition(b" ")
    # compare_digest: the time taken says nothing about how much of the key was right.
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)


class ApiKeyMiddleware:
    """401 (OpenAI's shape and code) for a /v1/* request without `Authorization: Bearer KEY`."""

    def __init__(self, app: Callable[..., Awaitable[None]], api_key: str):
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not bearer_matches(given, self.key):
                response = error_response(
                    401,
                    "a valid API key is required (Authorization: Bearer <key>)",
                    code="invalid_api_key",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to pass `limit` bytes: by its declared
    length before reading any of it, or while reading a chunked one."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def request_priority(
    headers: Mapping[str, str], body_priority: int, settings: GuardSettings
) -> int:
    """The priority to schedule a request with (lower is served first)."""
    if body_priority != 0:
        raise APIError(
            400,
            "priority is not taken from the request body: it is set by the operator "
            "(the router's X-KVPilot-Priority, from the API key's tier); leave it out",
            param="priority",
            code="unsupported",
        )
    if not settings.trust_priority_header:
        return 0
    raw = headers.get(PRIORITY_HEADER)
    if raw is None:
        return 0
    try:
        return int(raw)
    except ValueError:
        raise APIError(
            400, f"{PRIORITY_HEADER} must be an integer, got {raw!r}", code="invalid_value"
        ) from None
