"""The Batch API's routes, and how the batch service plugs into the router.

`POST /v1/files` (multipart, `purpose=batch`), `GET /v1/files/{id}`, `GET /v1/files/{id}/content`,
`POST /v1/batches`, `GET /v1/batches/{id}`, `GET /v1/batches`, `POST /v1/batches/{id}/cancel`:
OpenAI's paths and objects, behind the router's API key. A batch's file is checked whole when the
batch is created: a file that is not all requests for the batch's endpoint and one model becomes
a `failed` batch whose `errors` name the lines, and nothing of it runs; a request the engine
refuses becomes a line in the batch's error file.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvpilot_engine.batch import protocol
from prometheus_client import CollectorRegistry
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kvpilot_operator.router.batch.meter import BatchMeter, SLOTargets
from kvpilot_operator.router.batch.metrics import BatchMetrics
from kvpilot_operator.router.batch.objects import (
    Batch,
    BatchErrorData,
    BatchErrors,
    RequestCounts,
    page,
    window_seconds,
)
from kvpilot_operator.router.batch.store import BatchStore, new_id
from kvpilot_operator.router.batch.worker import BatchWorker

if TYPE_CHECKING:
    from kvpilot_operator.router.proxy import Router

DEFAULT_MAX_FILE_BYTES = 100 * 2**20
# Far after interactive tiers (lower is first; the router's default is 0).
DEFAULT_BATCH_PRIORITY = 1000
MAX_ERRORS_LISTED = 50  # a failed validation names at most this many lines


@dataclass(frozen=True)
class BatchSettings:
    directory: str
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    max_in_flight: int = 16  # batch requests sent at once, over all batches
    priority: int = DEFAULT_BATCH_PRIORITY
    # Send another batch request only while every engine reports at most this many waiting.
    max_engine_waiting: float = 0.0
    # The service's interactive SLO: batch admission backs off before it is at risk (meter.py).
    slo: SLOTargets = field(default_factory=SLOTargets)


def _error(status: int, message: str, code: str, param: str | None = None) -> Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status)


_UNAUTHORIZED = ("a valid API key is required (Authorization: Bearer <key>)", "invalid_api_key")


class BatchService:
    def __init__(
        self,
        settings: BatchSettings,
        registry: CollectorRegistry,
        router: Router,
    ):
        self.settings = settings
        self.router = router
        self.store = BatchStore(settings.directory)
        self.metrics = BatchMetrics(registry)
        self.meter = BatchMeter(settings.max_in_flight, settings.slo)
        self.worker = BatchWorker(
            self.store,
            self._call,
            self.metrics,
            self._has_room,
            max_in_flight=settings.max_in_flight,
        )
        self._task: asyncio.Task[None] | None = None

    # ---- lifecycle and the bridge to the proxy -----------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self.worker.run())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.worker.aclose()

    def _has_room(self) -> bool:
        """Room for one more batch request: nothing interactive waits in the router, and no
        engine has a queue. With no endpoint at all, one request goes and waits in the router's
        queue: that queue is what scales a service up from zero."""
        r = self.router
        if not r.table.has_primary():
            return self.worker.in_flight == 0
        if r.admission.waiting > 0:
            return False
        limit_now = self.meter.current(time.monotonic())
        self.metrics.limit.set(limit_now)
        if self.worker.in_flight >= limit_now:
            return False
        limit = self.settings.max_engine_waiting
        return all(
            (st.waiting or 0.0) <= limit for st in r.table.endpoints.values() if st.endpoint.ready
        )

    async def _call(self, path: str, body: bytes) -> tuple[int, bytes]:
        """POST through the router's own proxy, in-process, at the batch priority."""
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
            "client": None,
            "server": None,
            "kvpilot.priority": self.settings.priority,
        }
        delivered = False
        never = asyncio.Event()
        status = 0
        chunks: list[bytes] = []

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await never.wait()  # the client never leaves; cancelling the call is leaving
            return {"type": "http.disconnect"}

        async def send(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.router.generate(scope, receive, send)
        return status or 502, b"".join(chunks)

    # ---- routes --------------------------------------------------------------------------------
    def routes(self) -> list[Route]:
        """Every route behind the router's API key: checked here once, not in each endpoint."""
        guard = self._authorized
        return [
            Route("/v1/files", guard(self.create_file), methods=["POST"]),
            Route("/v1/files/{file_id}", guard(self.get_file), methods=["GET"]),
            Route("/v1/files/{file_id}/content", guard(self.file_content), methods=["GET"]),
            Route("/v1/batches", guard(self.create_batch), methods=["POST"]),
            Route("/v1/batches", guard(self.list_batches), methods=["GET"]),
            Route("/v1/batches/{batch_id}", guard(self.get_batch), methods=["GET"]),
            Route("/v1/batches/{batch_id}/cancel", guard(self.cancel_batch), methods=["POST"]),
        ]

    def _authorized(
        self, endpoint: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def guarded(request: Request) -> Response:
            if self.router._priority(request.scope) is None:  # no (valid) key
                return _error(401, *_UNAUTHORIZED)
            return await endpoint(request)

        return guarded

    async def create_file(self, request: Request) -> Response:
        limit = self.settings.max_file_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit + 64 * 1024:  # the form's own bytes
            return _too_large(limit)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit + 64 * 1024:
                return _too_large(limit)
        replay = Request(request.scope, _replay(bytes(body)))
        try:
            form = await replay.form(max_files=1, max_fields=8)
        except Exception as e:  # not multipart, or a malformed one
            return _error(400, f"expected a multipart form with file and purpose: {e}", "invalid")
        upload, purpose = form.get("file"), form.get("purpose")
        if purpose != "batch":
            return _error(
                400, f"purpose must be 'batch', got {purpose!r}", "invalid_value", "purpose"
            )
        if upload is None or isinstance(upload, str):
            return _error(400, "the form has no file", "invalid_value", "file")
        data = await upload.read()
        if len(data) > limit:
            return _too_large(limit)
        obj = await asyncio.to_thread(
            self.store.add_file, upload.filename or "batch.jsonl", purpose, data
        )
        return JSONResponse(obj.model_dump())

    async def get_file(self, request: Request) -> Response:
        fid = request.path_params["file_id"]
        obj = self.store.get_file(fid)
        if obj is None:
            return _error(404, f"no file {fid!r}", "not_found", "file_id")
        return JSONResponse(obj.model_dump())

    async def file_content(self, request: Request) -> Response:
        fid = request.path_params["file_id"]
        data = await asyncio.to_thread(self.store.file_content, fid)
        if data is None:
            return _error(404, f"no file {fid!r}", "not_found", "file_id")
        return Response(data, media_type="application/jsonl")

    async def create_batch(self, request: Request) -> Response:
        try:
            doc = json.loads(await request.body())
            if not isinstance(doc, dict):
                raise ValueError("the body must be a JSON object")
        except ValueError as e:
            return _error(400, f"the body is not a JSON object: {e}", "invalid_json")
        endpoint = doc.get("endpoint")
        if endpoint not in protocol.ENDPOINTS:
            message = f"endpoint must be one of {', '.join(protocol.ENDPOINTS)}, got {endpoint!r}"
            return _error(400, message, "invalid_value", "endpoint")
        window = doc.get("completion_window", "24h")
        try:
            seconds = window_seconds(window if isinstance(window, str) else "")
        except ValueError as e:
            return _error(400, str(e), "invalid_value", "completion_window")
        metadata = doc.get("metadata")
        if metadata is not None and not (
            isinstance(metadata, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
        ):
            return _error(400, "metadata must map strings to strings", "invalid_value", "metadata")
        fid = doc.get("input_file_id")
        file = self.store.get_file(fid) if isinstance(fid, str) else None
        if file is None:
            return _error(404, f"no file {fid!r}", "not_found", "input_file_id")
        if file.purpose != "batch":
            message = f"file {fid!r} has purpose {file.purpose!r}, not 'batch'"
            return _error(400, message, "invalid_value", "input_file_id")
        data = await asyncio.to_thread(self.store.file_content, fid) or b""
        errors = await asyncio.to_thread(validate, data, endpoint)
        now = int(time.time())
        batch = Batch(
            id=new_id("batch_"),
            endpoint=endpoint,
            input_file_id=fid,
            completion_window=window,
            status="in_progress",
            created_at=now,
            in_progress_at=now,
            expires_at=now + seconds,
            metadata=metadata,
        )
        if errors:
            batch.status, batch.failed_at, batch.in_progress_at = "failed", now, None
            batch.errors = BatchErrors(data=errors)
        else:
            total = sum(1 for ln in protocol.read_lines(data) if ln.request is not None)
            batch.request_counts = RequestCounts(total=total)
        self.store.save_batch(batch)
        return JSONResponse(batch.model_dump())

    async def get_batch(self, request: Request) -> Response:
        bid = request.path_params["batch_id"]
        batch = self.store.get_batch(bid)
        if batch is None:
            return _error(404, f"no batch {bid!r}", "not_found", "batch_id")
        return JSONResponse(batch.model_dump())

    async def list_batches(self, request: Request) -> Response:
        raw = request.query_params.get("limit", "20")
        if not raw.isdigit() or not 1 <= int(raw) <= 100:
            return _error(400, "limit must be between 1 and 100", "invalid_value", "limit")
        limit, after = int(raw), request.query_params.get("after")
        batches = list(self.store.batches())
        if after:
            ids = [b.id for b in batches]
            batches = batches[ids.index(after) + 1 :] if after in ids else []
        shown = batches[:limit]
        first = shown[0].id if shown else None
        last = shown[-1].id if shown else None
        items = [b.model_dump() for b in shown]
        return JSONResponse(page(items, first, last, len(batches) > limit))

    async def cancel_batch(self, request: Request) -> Response:
        bid = request.path_params["batch_id"]
        batch = self.store.get_batch(bid)
        if batch is None:
            return _error(404, f"no batch {bid!r}", "not_found", "batch_id")
        if batch.status in ("validating", "in_progress"):
            batch.status, batch.cancelling_at = "cancelling", int(time.time())
            self.store.save_batch(batch)
            self.worker.cancel(bid)
        elif batch.status not in ("cancelling", "cancelled"):
            message = f"batch {bid} is {batch.status}; only a running batch can be cancelled"
            return _error(409, message, "invalid_state")
        return JSONResponse(batch.model_dump())


def validate(data: bytes, endpoint: str) -> list[BatchErrorData]:
    """Why a batch file cannot run, line by line (empty when it can): lines that are no request,
    requests for another endpoint, or for more than one model."""
    lines = protocol.read_lines(data)
    errors: list[BatchErrorData] = []
    if not lines:
        errors.append(BatchErrorData(code="empty_file", message="the file has no requests"))
    models: dict[str, int] = {}
    for ln in lines:
        if ln.error is not None:
            errors.append(
                BatchErrorData(code=ln.error.code, message=ln.error.message, line=ln.number)
            )
            continue
        assert ln.request is not None
        if ln.request.url != endpoint:
            message = (
                f"line {ln.number}: url {ln.request.url} is not the batch's endpoint {endpoint}"
            )
            errors.append(
                BatchErrorData(
                    code="mismatched_endpoint", message=message, param="url", line=ln.number
                )
            )
        model = ln.request.body.get("model")
        if not isinstance(model, str):
            message = f"line {ln.number}: body.model must be a string"
            errors.append(
                BatchErrorData(
                    code="invalid_model", message=message, param="body.model", line=ln.number
                )
            )
        else:
            models.setdefault(model, ln.number)
    if len(models) > 1:
        (first, a), (second, b) = list(models.items())[:2]
        message = f"one model per batch: line {a} names {first!r}, line {b} {second!r}"
        errors.append(
            BatchErrorData(code="mismatched_model", message=message, param="body.model", line=b)
        )
    return errors[:MAX_ERRORS_LISTED]


def _too_large(limit: int) -> Response:
    return _error(413, f"the file is larger than {limit} bytes", "file_too_large", "file")


def _replay(body: bytes) -> Callable[[], Any]:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def add_batch_args(p: Any) -> None:
    """`kvpilot router`'s Batch API flags."""
    p.add_argument(
        "--batch-dir",
        default=None,
        help="serve OpenAI's Batch API (/v1/files, /v1/batches), keeping files, batches and "
        "results in this directory (a PVC in a cluster); off without it",
    )
    p.add_argument(
        "--batch-max-file-bytes",
        type=int,
        default=DEFAULT_MAX_FILE_BYTES,
        help="larger uploads get 413 (default: 100 MiB)",
    )
    p.add_argument(
        "--batch-max-in-flight",
        type=int,
        default=16,
        help="batch requests sent to the engines at once, over all batches (default: 16)",
    )
    p.add_argument(
        "--batch-priority",
        type=int,
        default=DEFAULT_BATCH_PRIORITY,
        help="X-KVPilot-Priority of batch requests (lower first; default: 1000)",
    )
    p.add_argument(
        "--batch-slo-ttft-ms",
        type=float,
        default=None,
        help="the service's interactive TTFT target: batch requests in flight are halved when "
        "interactive TTFT nears it and grow back one at a time when far under it",
    )
    p.add_argument(
        "--batch-slo-tpot-ms",
        type=float,
        default=None,
        help="the same for the interactive TPOT target",
    )
    p.add_argument(
        "--batch-slo-percentile",
        type=float,
        default=95.0,
        help="the percentile those targets hold (default: 95)",
    )


def batch_settings(ns: Any) -> BatchSettings | None:
    if not getattr(ns, "batch_dir", None):
        return None
    if ns.batch_max_file_bytes < 1 or ns.batch_max_in_flight < 1:
        raise ValueError("--batch-max-file-bytes and --batch-max-in-flight must be at least 1")
    return BatchSettings(
        directory=ns.batch_dir,
        max_file_bytes=ns.batch_max_file_bytes,
        max_in_flight=ns.batch_max_in_flight,
        priority=ns.batch_priority,
        slo=SLOTargets(
            ttft_s=ns.batch_slo_ttft_ms / 1000 if ns.batch_slo_ttft_ms else None,
            tpot_s=ns.batch_slo_tpot_ms / 1000 if ns.batch_slo_tpot_ms else None,
            percentile=ns.batch_slo_percentile,
        ),
    )
