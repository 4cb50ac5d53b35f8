"""The router's HTTP side: an ASGI app that proxies the OpenAI generation routes.

The generation routes are raw ASGI rather than Starlette request/response handlers, so that
upstream bytes go to the client as they arrive (no buffering; a slow client slows the upstream
read, which is the backpressure we want), and so that one task watches for the client leaving
from the moment the body is read: queued, connecting or streaming, the upstream request is then
closed and the engine aborts it and frees its KV blocks.

The body is parsed only for what routing needs (prompt prefix, stream, greedy, model) and is
sent upstream byte for byte, but for a LoRA adapter's request that an engine knows by another
name (a canary's version): then its `model` is that name (`adapters`). A request is retried on
another endpoint only while nothing has been sent to the client: on a refused or dropped
connection, or a 503 before the first byte. When an
engine answers 503 "unavailable" (draining on SIGTERM, or still loading) and no other endpoint
is left, the request waits up to `failover_wait` seconds for one to appear: during a rolling
update with one replica the replacement is Ready moments before the router's next discovery
poll sees it, and the user should not get the old pod's goodbye.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kvpilot_operator.router.adapters import AdapterRouter, Choice, Placement
from kvpilot_operator.router.admission import Admission, Rejected
from kvpilot_operator.router.batch.api import BatchService, BatchSettings
from kvpilot_operator.router.discovery import (
    Snapshot,
    Source,
    follow,
    read_models,
    scrape_loop,
)
from kvpilot_operator.router.metrics import RouterMetrics
from kvpilot_operator.router.shadow import (
    DEFAULT_SHADOW_CONCURRENCY,
    DEFAULT_SHADOW_TIMEOUT,
    Mirror,
    Outcome,
    ShadowTarget,
)
from kvpilot_operator.router.sse import ResponseReader
from kvpilot_operator.router.table import EndpointState, RouteTable

log = structlog.get_logger("kvpilot.router")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")  # the engine's rule
# The engine's scheduling priority (lower first), which it trusts with --trust-priority-header:
# set here from the caller's API key, and never passed on from a client.
PRIORITY_HEADER = b"x-kvpilot-priority"
# Not forwarded upstream: hop-by-hop headers, and what the proxy sets itself. The client's key
# is for the router; the engines get the router's own (`upstream_api_key`).
_DROP_REQUEST_HEADERS = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
        b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"host", b"content-length",
        b"authorization", b"x-request-id", PRIORITY_HEADER,
    }
)  # fmt: skip
_FORWARD_RESPONSE_HEADERS = frozenset(
    {b"content-type", b"content-length", b"content-encoding", b"retry-after"}
)
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


@dataclass(frozen=True)
class ProxySettings:
    retries: int = 2
    connect_timeout: float = 2.0
    request_timeout: float = 600.0
    max_in_flight: int = 1024
    max_queue: int = 1024
    queue_timeout: float = 60.0
    max_request_bytes: int = 8 * 2**20  # the engine's default: what it takes, we take
    failover_wait: float = 10.0
    api_keys: tuple[str, ...] = ()
    priority_keys: tuple[tuple[str, int], ...] = ()  # (key, priority): tiers, keys themselves
    default_priority: int = 0  # for api_keys, and for everyone when no key is required
    upstream_api_key: str | None = None  # what the engines' `kvpilot serve --api-key` expects
    refresh_interval: float = 1.0
    scrape_interval: float = 2.0
    shadow_timeout: float = DEFAULT_SHADOW_TIMEOUT
    shadow_concurrency: int = DEFAULT_SHADOW_CONCURRENCY
    batch: BatchSettings | None = None  # the Batch API, when it has somewhere to keep files


def _unavailable(body: bytes) -> bool:
    """An engine's 503 that says it is going away or not up yet (code "unavailable"), as opposed
    to one that is full ("overloaded"): only the first is worth waiting out."""
    with contextlib.suppress(ValueError, LookupError, TypeError):
        return json.loads(body)["error"]["code"] == "unavailable"
    return False


def _code(body: bytes) -> str | None:
    with contextlib.suppress(ValueError, LookupError, TypeError):
        return str(json.loads(body)["error"]["code"])
    return None


def _message(body: bytes) -> str:
    with contextlib.suppress(ValueError, LookupError, TypeError):
        return str(json.loads(body)["error"]["message"])
    return body.decode(errors="replace")[:200]


def error_body(status: int, message: str, code: str | None, param: str | None = None) -> bytes:
    """OpenAI's error shape, typed as the engine types its own errors."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    error = {"message": message, "type": kind, "param": param, "code": code}
    return json.dumps({"error": error}).encode()


_UNAUTHORIZED = error_body(
    401, "a valid API key is required (Authorization: Bearer <key>)", "invalid_api_key"
)


# ---- what routing needs from the body -----------------------------------------------------------
@dataclass(frozen=True)
class ParsedRequest:
    prompt: str  # flattened: the affinity key is its first prefix_chars characters
    stream: bool
    greedy: bool
    model: str | None = None  # the base model's name or an adapter's


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def parse_request(body: bytes) -> ParsedRequest:
    """Raises ValueError for a body that is not a JSON object."""
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise ValueError(f"the body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError("the body must be a JSON object")
    messages = doc.get("messages")
    if isinstance(messages, list):
        prompt = "".join(
            f"{m.get('role', '')}:{_text_of(m.get('content'))}\n"
            for m in messages
            if isinstance(m, dict)
        )
        tools = doc.get("tools")
        if tools and doc.get("tool_choice") != "none":
            # The engine renders the tools ahead of the messages: requests that share a tool list
            # share that prefix of KV cache, so they should share an endpoint.
            prompt = f"tools:{json.dumps(tools, sort_keys=True)}\n{prompt}"
    else:
        raw = doc.get("prompt", "")
        if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], (str, list)):
            raw = raw[0]
        prompt = raw if isinstance(raw, str) else json.dumps(raw)  # token ids hash as well
    temperature, top_k = doc.get("temperature"), doc.get("top_k")
    greedy = temperature == 0 or top_k == 1
    model = doc.get("model")
    return ParsedRequest(
        prompt, doc.get("stream") is True, greedy, model if isinstance(model, str) else None
    )


# ---- one request as it passes -------------------------------------------------------------------
@dataclass
class Exchange:
    rid: str
    path: str
    t0: float  # receipt, perf_counter
    body: bytes = b""  # as sent upstream (`model` set to the engine's name for an adapter)
    client_body: bytes = b""  # as the client sent it
    request: ParsedRequest | None = None
    upstream_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    status: int = 0  # what the client was sent; 0 until the response starts
    revision: str = ""
    endpoint: str = ""
    sse: bool = False
    retries: int = 0
    sent_at: float = 0.0  # the successful upstream attempt's send
    reader: ResponseReader | None = None
    outcome: Outcome | None = None  # set once the answer was forwarded whole
    mirror_decided: bool = False
    mirrored: asyncio.Future[Outcome | None] | None = None  # gets `outcome` when mirrored
    adapter: Choice | None = None  # the adapter version chosen, for an adapter's request
    load_error: str = ""  # why the chosen version could not be loaded, when it could not
    sent_model: str | None = None  # the `model` in `body` now (rewritten per engine's name)
    priority: int | None = None  # the caller's, once its key is checked


class BodyTooLarge(Exception):
    pass


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The body (None if the client left), read before admission, so bounded: BodyTooLarge as
    soon as it is known to pass `limit` bytes, by its declared length or while reading it."""
    declared = dict(scope["headers"]).get(b"content-length", b"")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _RawEndpoint:
    """A plain ASGI endpoint (Starlette wraps functions as request/response handlers)."""

    def __init__(self, handler: Callable[[Scope, Receive, Send], Awaitable[None]]):
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send)


class Router:
    def __init__(
        self,
        table: RouteTable,
        settings: ProxySettings,
        source: Source | None = None,
    ):
        self.table = table
        self.settings = settings
        self.source = source
        self.admission = Admission(settings.max_in_flight, settings.max_queue, table.has_primary)
        self.adapters = AdapterRouter(table)
        self._models_read_at = -1.0
        self.metrics = RouterMetrics(lambda: self.admission.waiting)
        self.client: httpx.AsyncClient | None = None
        self.mirror: Mirror | None = None
        self._keys = [(k.encode(), settings.default_priority) for k in settings.api_keys]
        self._keys += [(k.encode(), p) for k, p in settings.priority_keys]
        self._upstream_auth: list[tuple[bytes, bytes]] = []
        if settings.upstream_api_key:
            bearer = b"Bearer " + settings.upstream_api_key.encode()
            self._upstream_auth = [(b"authorization", bearer)]
        self._tasks: list[asyncio.Task[None]] = []
        self._applied: Snapshot | None = None
        self.batch = (
            BatchService(settings.batch, self.metrics.registry, self) if settings.batch else None
        )

    # ---- routes and lifecycle -------------------------------------------------------------------
    def apply(self, snap: Snapshot) -> None:
        """A snapshot from discovery: a changed one (Kubernetes, a rewritten file), or at start."""
        self.table.update(snap.config, snap.endpoints)
        self.adapters.update(snap.config)
        self.metrics.set_endpoints(self.table.ready_counts())
        self.admission.wake()  # endpoints may have appeared for queued requests
        if snap != self._applied:
            self._applied = snap
            log.info(
                "routes",
                revisions=[(r.name, r.weight) for r in snap.config.revisions],
                shadow=snap.config.shadow.revision if snap.config.shadow else None,
                endpoints=[(e.url, e.revision) for e in snap.endpoints],
            )

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        s = self.settings
        self.client = httpx.AsyncClient(
            # No read timeout: a long generation is silent between tokens; the total request
            # timeout bounds it. Idle upstream connections are dropped before the engine's
            # 5 s keep-alive would, so we never write into a connection it is closing.
            timeout=httpx.Timeout(connect=s.connect_timeout, read=None, write=None, pool=None),
            # Admission bounds the connections; keep as many alive as may be in use at once.
            limits=httpx.Limits(
                max_connections=None,
                max_keepalive_connections=s.max_in_flight + s.shadow_concurrency,
                keepalive_expiry=4.0,
            ),
        )
        self.mirror = Mirror(
            self.table, self.client, self.metrics, s.shadow_timeout, s.shadow_concurrency
        )
        if self.source is not None:
            self._tasks.append(
                asyncio.create_task(follow(self.source, s.refresh_interval, self.apply))
            )
        self._tasks.append(
            asyncio.create_task(
                scrape_loop(self.table, self.client, s.scrape_interval, headers=self._upstream_auth)
            )
        )
        if self.batch is not None:
            self.batch.start()
        try:
            yield
        finally:
            if self.batch is not None:
                await self.batch.aclose()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.mirror.aclose()
            await self.client.aclose()

    def app(self) -> Starlette:
        generate = _RawEndpoint(self.generate)
        routes = [
            *(Route(p, generate, methods=["POST"]) for p in GENERATION_PATHS),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.ready, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
            Route("/router/state", self.state, methods=["GET"]),
            *(self.batch.routes() if self.batch is not None else ()),
        ]
        return Starlette(routes=routes, lifespan=self.lifespan)

    # ---- small routes -------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        # Ready with zero endpoints too: a service scaled to zero still takes (and queues)
        # requests, and its queue is what scales it up.
        if not self.table.loaded:
            body = error_body(503, "no routes loaded yet", "unavailable")
            return Response(body, 503, media_type="application/json")
        return JSONResponse({"status": "ready"})

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def state(self, request: Request) -> Response:
        # Behind the key: it lists the endpoints, which the key is there to keep callers off.
        if self._priority(request.scope) is None:
            return Response(_UNAUTHORIZED, 401, media_type="application/json")
        shadow = self.mirror.summary.to_dict() if self.mirror else {}
        return JSONResponse(
            {
                **self.table.snapshot(),
                "admission": {
                    "inFlight": self.admission.in_flight,
                    "waiting": self.admission.waiting,
                    "maxInFlight": self.admission.max_in_flight,
                    "maxQueue": self.admission.max_queue,
                },
                "shadow": {**shadow, "active": self.mirror.active if self.mirror else 0},
            }
        )

    async def models(self, request: Request) -> Response:
        rid = self._request_id(request.scope)
        if self._priority(request.scope) is None:
            self.metrics.rejected.labels("unauthorized").inc()
            self.metrics.requests.labels("", "401").inc()
            return Response(_UNAUTHORIZED, 401, {"x-request-id": rid}, "application/json")
        assert self.client is not None
        cards = self.adapters.listed()
        if self.adapters.routes or any(c["parent"] is not None for c in cards):
            # Engines may hold different adapters: the union of what they serve.
            self.metrics.requests.labels("", "200").inc()
            body = {"object": "list", "data": cards}
            return JSONResponse(body, headers={"x-request-id": rid})
        tried: set[str] = set()
        for _ in range(self.settings.retries + 1):
            st = self.table.pick_any(exclude=tried)
            if st is None:
                break
            try:
                resp = await self.client.get(
                    st.url + "/v1/models",
                    headers=[(b"x-request-id", rid.encode()), *self._upstream_auth],
                    timeout=10.0,
                )
            except httpx.TransportError:
                self.table.eject(st.url)
                tried.add(st.url)
                continue
            self.metrics.requests.labels(st.revision, str(resp.status_code)).inc()
            headers = {"x-kvpilot-revision": st.revision, "x-request-id": rid}
            ctype = resp.headers.get("content-type", "application/json")
            return Response(resp.content, resp.status_code, headers, media_type=ctype)
        self.metrics.requests.labels("", "503").inc()
        body = error_body(503, "no ready endpoint", "unavailable")
        return Response(body, 503, {"retry-after": "5", "x-request-id": rid}, "application/json")

    # ---- auth and ids -------------------------------------------------------------------------
    def _priority(self, scope: Scope) -> int | None:
        """The caller's priority, by its API key's tier; None for a caller without a valid key.
        The Batch API's own requests (in-process, never from a client) carry theirs."""
        if "kvpilot.priority" in scope:
            return int(scope["kvpilot.priority"])
        if not self._keys:
            return self.settings.default_priority
        value = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        token = token.strip()
        found = None
        for key, priority in self._keys:  # no early exit: the time says nothing about which key
            if hmac.compare_digest(token, key) and found is None:
                found = priority
        return found

    @staticmethod
    def _request_id(scope: Scope) -> str:
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        return given if _REQUEST_ID_RE.match(given) else uuid.uuid4().hex

    # ---- the generation routes ----------------------------------------------------------------
    async def generate(self, scope: Scope, receive: Receive, send: Send) -> None:
        ex = Exchange(self._request_id(scope), scope["path"], time.perf_counter())
        try:
            await self._generate(ex, scope, receive, send)
        finally:
            self._record(ex)

    async def _generate(self, ex: Exchange, scope: Scope, receive: Receive, send: Send) -> None:
        priority = ex.priority = self._priority(scope)
        if priority is None:
            self.metrics.rejected.labels("unauthorized").inc()
            await self._reply(ex, send, 401, _UNAUTHORIZED)
            return
        limit = self.settings.max_request_bytes
        try:
            body = await _read_body(scope, receive, limit)
        except BodyTooLarge:
            self.metrics.rejected.labels("too_large").inc()
            message = f"the request body is larger than {limit} bytes"
            await self._reply(ex, send, 413, error_body(413, message, "request_too_large"))
            return
        if body is None:
            ex.status = 499
            return
        try:
            ex.request = parse_request(body)
        except ValueError as e:
            self.metrics.rejected.labels("bad_request").inc()
            await self._reply(ex, send, 400, error_body(400, str(e), "invalid_json"))
            return
        ex.body = ex.client_body = body
        model = ex.request.model
        kind = self.adapters.classify(model)
        if kind == "unsure" and self.table.endpoints:
            await self._read_models()  # a router just started: ask rather than guess
            kind = self.adapters.classify(model)
        if kind == "unknown":
            self.metrics.rejected.labels("unknown_model").inc()
            message = f"The model `{model}` does not exist."
            await self._reply(ex, send, 404, error_body(404, message, "model_not_found", "model"))
            return
        if kind == "adapter":
            assert model is not None
            ex.adapter = self.adapters.choose(model, time.monotonic())
        ex.sent_model = model
        ex.upstream_headers = [
            (k, v) for k, v in scope["headers"] if k.lower() not in _DROP_REQUEST_HEADERS
        ]
        ex.upstream_headers += [
            *self._upstream_auth,  # shadows get it too: they are engines behind the same key
            (PRIORITY_HEADER, str(priority).encode()),
            (b"x-request-id", ex.rid.encode()),
            (b"content-length", str(len(body)).encode()),  # else httpx would send it chunked
        ]

        work = asyncio.create_task(self._exchange(ex, send))
        gone = asyncio.create_task(_until_disconnect(receive))
        done: set[asyncio.Task[None]] = set()
        try:
            remaining = self.settings.request_timeout - (time.perf_counter() - ex.t0)
            done, _ = await asyncio.wait(
                (work, gone), timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (work, gone):
                task.cancel()
            await asyncio.gather(work, gone, return_exceptions=True)
        if work in done:
            error = work.exception()
            if error is None:
                return
            log.error("proxy failure", exc_info=error, request_id=ex.rid)
            if ex.status == 0:
                await self._reply(ex, send, 500, error_body(500, "router error", "internal"))
            return
        if gone in done:
            ex.status = 499  # nginx's "client closed request": nobody reads it
            return
        # The total timeout: a clean error if nothing was sent yet, else the stream ends here.
        self.metrics.upstream_errors.labels(ex.revision, "timeout").inc()
        message = f"no complete answer within {self.settings.request_timeout:g}s"
        if ex.status == 0:
            await self._reply(ex, send, 504, error_body(504, message, "timeout"))
        else:
            await self._abort_stream(ex, send, message)

    async def _exchange(self, ex: Exchange, send: Send) -> None:
        try:
            await self.admission.admit(self.settings.queue_timeout)
        except Rejected as r:
            self.metrics.rejected.labels(r.reason).inc()
            if r.reason == "queue_full":
                message, code, retry = "the router's queue is full; retry later", "overloaded", 1
            else:
                message = f"no endpoint took the request within {self.settings.queue_timeout:g}s"
                code, retry = "unavailable", 5
            await self._reply(ex, send, 503, error_body(503, message, code), retry_after=retry)
            return
        try:
            assert ex.request is not None
            model = ex.request.model
            late = model is not None and ex.adapter is None
            if late and self.adapters.classify(model) == "adapter":
                # Unknown at receipt (no engine yet: scaled from zero), known now.
                assert model is not None
                ex.adapter = self.adapters.choose(model, time.monotonic())
            st = await self._pick(ex)
            if st is None and ex.load_error:
                # The version itself is broken (an adapter the engine refuses): the canary's
                # analysis counts this against it.
                body = error_body(502, ex.load_error, "adapter_unavailable", "model")
                await self._reply(ex, send, 502, body)
                return
            if st is None:  # the last endpoint went between admission and now
                body = error_body(503, "no ready endpoint", "unavailable")
                await self._reply(ex, send, 503, body, retry_after=5)
                return
            connected = await self._connect(ex, st, send)
            if connected is not None:
                await self._relay(ex, *connected, send=send)
        finally:
            self.admission.release()
            if ex.mirrored is not None and not ex.mirrored.done():
                ex.mirrored.set_result(ex.outcome)

    async def _body(self, ex: Exchange, st: EndpointState) -> AsyncIterator[bytes]:
        """The request body for httpx, which asks for more only once the bytes before are written:
        the shadow starts when the primary's request is on the wire, so its work fills the time
        the primary waits for the engine instead of delaying the primary's send."""
        yield ex.body
        if not ex.mirror_decided and self.mirror is not None and ex.request is not None:
            ex.mirror_decided = True
            target = self._adapter_shadow(ex, st.revision)
            if target is None and ex.adapter is not None and ex.adapter.role != "stable":
                return  # the model shadow compares the model: not with an adapter's canary
            headers = _shadow_headers(ex.upstream_headers)
            # The model shadow runs the same adapters under the names clients send.
            body = ex.body if target is not None else ex.client_body
            headers["content-length"] = str(len(body))
            ex.mirrored = self.mirror.start(ex.path, body, headers, ex.request.greedy, target)

    def _adapter_shadow(self, ex: Exchange, revision: str) -> ShadowTarget | None:
        """An adapter's shadow version, for its requests: on the primary's engines, of the
        primary's revision while it has one (the same base model, and the copies leave the
        revisions' round robin alone)."""
        route = self.adapters.routes.get(ex.adapter.model) if ex.adapter else None
        if route is None or route.shadow is None:
            return None
        shadow, body = route.shadow, ex.body
        choice = Choice(route.name, "shadow", shadow.path)

        async def place() -> tuple[EndpointState, bytes] | None:
            placement = self.adapters.place(choice, prefer=revision, now=time.monotonic())
            if placement is None:
                return None
            if placement.load_path is not None and not (await self._load(placement))[0]:
                return None
            doc = json.loads(body)
            doc["model"] = placement.name
            return placement.endpoint, json.dumps(doc).encode()

        label = f"{route.name}@shadow"
        return ShadowTarget(label, shadow.mirror_percent, shadow.max_rps, place)

    def _dispatch(self, st: EndpointState) -> None:
        self.table.acquire(st)
        self.metrics.in_flight.labels(st.revision).inc()

    def _undispatch(self, st: EndpointState) -> None:
        self.table.release(st)
        self.metrics.in_flight.labels(st.revision).dec()

    async def _connect(
        self, ex: Exchange, st: EndpointState, send: Send
    ) -> tuple[EndpointState, httpx.Response] | None:
        """Send upstream, retrying elsewhere while nothing reached the client. Returns the
        endpoint and its response (dispatched: _relay undispatches), or None once answered."""
        assert self.client is not None and ex.request is not None
        tried: set[str] = set()
        failover_deadline: float | None = None
        while True:
            self._dispatch(st)
            resp: httpx.Response | None = None
            request = self.client.build_request(
                "POST", st.url + ex.path, content=self._body(ex, st), headers=ex.upstream_headers
            )
            ex.sent_at = time.perf_counter()
            try:
                resp = await self.client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout):
                self.table.eject(st.url)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                pass  # closed before answering (a dying pod, a stale connection): try elsewhere
            except BaseException:
                self._undispatch(st)
                raise
            if resp is not None and resp.status_code >= 500:
                self.metrics.upstream_errors.labels(st.revision, "status_5xx").inc()
            if resp is not None and resp.status_code != 503:
                return st, resp
            if resp is None:
                self.metrics.upstream_errors.labels(st.revision, "connect").inc()
            tried.add(st.url)
            retry = None
            if ex.retries < self.settings.retries:
                retry = await self._pick(ex, exclude=tried, prefer=st.revision)
            body = b""
            if retry is None and resp is not None:
                body = await resp.aread()
                if _unavailable(body):
                    if failover_deadline is None:
                        failover_deadline = time.monotonic() + self.settings.failover_wait
                    retry = await self._await_endpoint(ex, tried, failover_deadline)
            if retry is None:
                if resp is not None:
                    # The last 503, as the engine said it (with its Retry-After).
                    ex.revision, ex.endpoint = st.revision, st.url
                    self._undispatch(st)
                    await resp.aclose()
                    retry_after = resp.headers.get("retry-after", "5")
                    await self._reply(
                        ex, send, 503, body, int(retry_after) if retry_after.isdigit() else 5
                    )
                    return None
                self._undispatch(st)
                message = f"no endpoint answered ({len(tried)} tried)"
                await self._reply(ex, send, 502, error_body(502, message, "upstream_unavailable"))
                return None
            self._undispatch(st)
            if resp is not None:
                self.table.eject(st.url)  # draining or overloaded: give it a few seconds
                await resp.aclose()
            self.metrics.retries.labels(st.revision).inc()
            ex.retries += 1
            st = retry

    async def _await_endpoint(
        self, ex: Exchange, tried: set[str], deadline: float
    ) -> EndpointState | None:
        """An endpoint not yet tried, once discovery brings one, or None at the deadline."""
        assert ex.request is not None
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            st = await self._pick(ex, exclude=tried)
            if st is not None:
                return st
        return None

    # ---- adapters -------------------------------------------------------------------------------
    async def _pick(
        self,
        ex: Exchange,
        exclude: set[str] | frozenset[str] = frozenset(),
        prefer: str | None = None,
    ) -> EndpointState | None:
        """The endpoint for the request (an adapter's: one that holds its version, or loads it
        now), with the body's `model` set to that endpoint's name for the version."""
        assert ex.request is not None
        if ex.adapter is None:
            return self.table.pick(ex.request.prompt, exclude=exclude, prefer=prefer)
        for _ in range(3):  # a refused runtime load marks its engine: the next placement differs
            placement = self.adapters.place(ex.adapter, exclude, prefer, now=time.monotonic())
            if placement is None:
                return None
            if placement.load_path is not None:
                loaded, why = await self._load(placement)
                if why:
                    ex.load_error = why
                    return None
                if not loaded:
                    continue
            self._rewrite_model(ex, placement.name)
            return placement.endpoint
        return None

    def _rewrite_model(self, ex: Exchange, name: str) -> None:
        if name == ex.sent_model:
            return
        doc = json.loads(ex.body)
        doc["model"] = name
        ex.body = json.dumps(doc).encode()
        ex.sent_model = name
        ex.upstream_headers = [
            (k, str(len(ex.body)).encode() if k == b"content-length" else v)
            for k, v in ex.upstream_headers
        ]

    async def _load(self, placement: Placement) -> tuple[bool, str]:
        """Ask an engine to load an adapter version now (`POST /v1/load_lora_adapter`):
        (loaded, why the version cannot be: the engine refused its files, else "")."""
        assert self.client is not None and placement.load_path is not None
        st = placement.endpoint
        try:
            resp = await self.client.post(
                st.url + "/v1/load_lora_adapter",
                json={"lora_name": placement.name, "lora_path": placement.load_path},
                headers=self._upstream_auth,
                timeout=self.settings.request_timeout,
            )
        except httpx.TransportError:
            self.table.eject(st.url)
            return False, ""
        already = resp.status_code == 400 and "already" in resp.text
        if resp.status_code == 200 or already:
            self.adapters.loaded(st, placement.name, placement.load_path)
            log.info("adapter loaded", endpoint=st.url, adapter=placement.name)
            return True, ""
        if resp.status_code in (400, 404) and _code(resp.content) not in (
            "runtime_lora_updating_disabled",
            None,
        ):
            # The engine read the files and refused them (corrupt, rank too high, not found).
            message = f"adapter {placement.name} ({placement.load_path}) cannot be loaded: "
            return False, message + _message(resp.content)
        log.info(
            "runtime adapter load refused", endpoint=st.url, status=resp.status_code,
            adapter=placement.name,
        )  # fmt: skip
        self.adapters.refused(st, time.monotonic())
        return False, ""

    async def _read_models(self) -> None:
        """The models of the ready engines not read yet (before the scrape loop's next round)."""
        assert self.client is not None
        if time.monotonic() - self._models_read_at < 1.0:
            return  # an upstream without /v1/models is not asked on every request
        self._models_read_at = time.monotonic()
        unread = [
            st.url
            for st in self.table.endpoints.values()
            if st.models is None and st.endpoint.ready
        ]
        await asyncio.gather(
            *(read_models(self.table, self.client, u, 2.0, self._upstream_auth) for u in unread)
        )

    async def _relay(
        self,
        ex: Exchange,
        st: EndpointState,
        resp: httpx.Response,
        send: Send,
    ) -> None:
        try:
            ex.revision, ex.endpoint = st.revision, st.url
            ex.sse = resp.headers.get("content-type", "").startswith("text/event-stream")
            keep_text = ex.mirrored is not None and resp.status_code == 200
            ex.reader = reader = ResponseReader(ex.sse, keep_text)
            headers = [
                (k, v) for k, v in resp.headers.raw if k.lower() in _FORWARD_RESPONSE_HEADERS
            ]
            headers += [
                (b"x-kvpilot-revision", st.revision.encode()),
                (b"x-request-id", ex.rid.encode()),
            ]
            ex.status = resp.status_code
            await send({"type": "http.response.start", "status": ex.status, "headers": headers})
            try:
                async for chunk in resp.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    reader.feed(chunk, time.perf_counter())
            except httpx.HTTPError as e:
                self.metrics.upstream_errors.labels(st.revision, "stream_broken").inc()
                await self._abort_stream(ex, send, f"the upstream stream broke: {e!r}")
                return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            first = reader.first_text
            ex.outcome = Outcome(
                resp.status_code,
                reader.texts(),
                time.perf_counter() - ex.sent_at,
                None if first is None else first - ex.sent_at,
            )
        finally:
            await resp.aclose()  # also on cancellation: the engine sees the close and aborts
            self._undispatch(st)

    # ---- replies and bookkeeping ----------------------------------------------------------------
    async def _reply(
        self, ex: Exchange, send: Send, status: int, body: bytes, retry_after: int | None = None
    ) -> None:
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", ex.rid.encode()),
        ]
        if retry_after is not None:
            headers.append((b"retry-after", str(retry_after).encode()))
        ex.status = status
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _abort_stream(self, ex: Exchange, send: Send, message: str) -> None:
        """End a response whose status line is gone. An event stream gets an error event, as the
        engine sends when it fails mid-stream; any other body is left short, so the server
        drops the connection and the client cannot take a truncated body for a whole one."""
        log.warning("stream cut", request_id=ex.rid, endpoint=ex.endpoint, reason=message)
        if ex.sse:
            event = b"data: " + error_body(502, message, "upstream_error") + b"\n\n"
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": event, "more_body": False})

    def _meter_batch(self, ex: Exchange, reader: ResponseReader) -> None:
        """An interactive request's latency is what the Batch API's admission holds down."""
        batch = self.batch
        if batch is None or ex.priority is None or ex.priority >= batch.settings.priority:
            return
        if reader.first_text is None:
            return
        tpot = None
        if reader.text_events >= 2 and reader.last_text is not None:
            tpot = (reader.last_text - reader.first_text) / (reader.text_events - 1)
        batch.meter.observe(time.monotonic(), reader.first_text - ex.t0, tpot)

    def _record(self, ex: Exchange) -> None:
        m, code = self.metrics, str(ex.status or 499)
        e2e = time.perf_counter() - ex.t0
        m.requests.labels(ex.revision, code).inc()
        m.e2e.labels(ex.revision).observe(e2e)
        adapter = ex.adapter
        if adapter is not None:
            m.adapter_requests.labels(adapter.model, adapter.role, code).inc()
        reader = ex.reader
        if reader is not None and reader.sse and ex.status == 200:
            if reader.first_text is not None:
                m.ttft.labels(ex.revision).observe(reader.first_text - ex.t0)
                if adapter is not None:
                    m.adapter_ttft.labels(adapter.model, adapter.role).observe(
                        reader.first_text - ex.t0
                    )
            if reader.text_events >= 2 and reader.first_text is not None:
                assert reader.last_text is not None
                gap = (reader.last_text - reader.first_text) / (reader.text_events - 1)
                m.tpot.labels(ex.revision).observe(gap)
                if adapter is not None:
                    m.adapter_tpot.labels(adapter.model, adapter.role).observe(gap)
            self._meter_batch(ex, reader)
        log.info(
            "http_request",
            request_id=ex.rid,
            path=ex.path,
            status=int(code),
            revision=ex.revision or None,
            endpoint=ex.endpoint or None,
            adapter=f"{ex.adapter.model}/{ex.adapter.role}" if ex.adapter else None,
            retries=ex.retries,
            duration_ms=round(e2e * 1000, 1),
        )


def _shadow_headers(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}
