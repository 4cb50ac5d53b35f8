"""Runs the active batches' requests, at low priority, only while the engines have room.

Each request goes through the router's own proxy in-process (admission, endpoint picking,
retries, failover: everything an interactive request gets) with the batch priority, which the
engines schedule after interactive work and preempt first. What the engines must not get is a
queue of batch requests in front of interactive ones, so a request is sent only while
(`has_room`) no interactive request waits in the router and the engines report no queue of their
own, and never more than `max_in_flight` at once. A batch thus fills the capacity interactive
traffic leaves idle and backs off as soon as it is needed.

A request that fails for a reason that passes (no endpoint, a 5xx, the engine overloaded) is
sent again after a pause; one the engine refuses (4xx) gets an error line. Each answer is on disk
before the request counts as done, so a router restarted mid-batch resumes with exactly the
requests that have no answer yet. One router works on a batch at a time (a lock file beside it).

A batch still unfinished when its completion window closes expires, as OpenAI's do: the requests
in flight are abandoned, every request without an answer gets a `batch_expired` line in the error
file, the answers already written stay in the output file, and the batch ends `expired`. The
batch is marked `finalizing` (with `expired_at`) before those lines are written, so a router
restarted halfway finishes expiring it rather than calling it complete; a router that starts
after a window closed expires the batch as soon as it finds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from kvpilot_engine.batch import protocol

from kvpilot_operator.router.batch.metrics import BatchMetrics
from kvpilot_operator.router.batch.objects import Batch, RequestCounts
from kvpilot_operator.router.batch.store import BatchStore

log = structlog.get_logger("kvpilot.router.batch")

# (status, body) for a POST of `body` to `path`
Call = Callable[[str, bytes], Awaitable[tuple[int, bytes]]]
TRANSIENT = frozenset({408, 429, 499, 500, 502, 503, 504})
# OpenAI's words for a request its batch's window closed on.
EXPIRED = protocol.BatchError(
    code="batch_expired",
    message="This request could not be executed before the completion window expired.",
)


class BatchWorker:
    def __init__(
        self,
        store: BatchStore,
        call: Call,
        metrics: BatchMetrics,
        has_room: Callable[[], bool],
        max_in_flight: int = 16,
        poll_interval: float = 0.5,
        retry_delay: float = 1.0,
    ):
        self.store = store
        self.call = call
        self.metrics = metrics
        self.has_room = has_room
        self.max_in_flight = max_in_flight
        self.poll_interval = poll_interval
        self.retry_delay = retry_delay
        self.in_flight = 0
        self._queued: dict[str, int] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancel: set[str] = set()

    # ---- the loop ------------------------------------------------------------------------------
    async def run(self) -> None:
        """Forever: start a task per active batch not yet running here; keep the gauges."""
        while True:
            try:
                self._poll()
            except Exception:
                log.exception("batch poll failed")
            await asyncio.sleep(self.poll_interval)

    def _poll(self) -> None:
        counts: dict[str, int] = {}
        progress = RequestCounts()  # over the active batches
        deadline: float | None = None
        for b in self.store.batches():
            counts[b.status] = counts.get(b.status, 0) + 1
            if not b.active:
                continue
            progress.total += b.request_counts.total
            progress.completed += b.request_counts.completed
            progress.failed += b.request_counts.failed
            if b.expires_at is not None:
                deadline = b.expires_at if deadline is None else min(deadline, b.expires_at)
            if b.id not in self._tasks:
                self._tasks[b.id] = asyncio.create_task(self._own(b.id))
        for status in ("validating", "in_progress", "finalizing", "completed", "failed"):
            counts.setdefault(status, 0)
        for status in ("cancelling", "cancelled", "expired"):
            counts.setdefault(status, 0)
        for status, n in counts.items():
            self.metrics.batches.labels(status).set(n)
        self.metrics.deadline.set(max(0.0, deadline - time.time()) if deadline else 0.0)
        self.metrics.deadline_at.set(deadline or 0.0)
        for state, n in progress.model_dump().items():
            self.metrics.active_requests.labels(state).set(n)
        self.metrics.requests.labels("queued").set(sum(self._queued.values()))
        self.metrics.requests.labels("running").set(self.in_flight)

    def cancel(self, bid: str) -> None:
        self._cancel.add(bid)

    async def aclose(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    # ---- one batch -------------------------------------------------------------------------------
    async def _own(self, bid: str) -> None:
        lock = self.store.batches_dir / f"{bid}.lock"
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another router runs it; look again later
                await asyncio.sleep(5.0)
                return
            await self._run(bid)
        except Exception:
            log.exception("batch failed", batch=bid)
            await asyncio.sleep(self.retry_delay)
        finally:
            os.close(fd)  # releases the lock
            self._tasks.pop(bid, None)
            self._queued.pop(bid, None)

    def _stopping(self, bid: str) -> bool:
        if bid in self._cancel:
            return True
        b = self.store.get_batch(bid)  # a cancel through another router
        return b is None or b.status == "cancelling" or _expired(b)

    async def _run(self, bid: str) -> None:
        batch = self.store.get_batch(bid)
        if batch is None or not batch.active:
            return
        data = self.store.file_content(batch.input_file_id) or b""
        lines = [ln.request for ln in protocol.read_lines(data) if ln.request is not None]
        ok, failed = self.store.answered(bid)
        batch.request_counts = RequestCounts(
            total=len(lines), completed=len(ok), failed=len(failed)
        )
        if batch.status in ("validating", "in_progress"):
            if batch.status == "validating" or batch.in_progress_at is None:
                batch.in_progress_at = int(time.time())
            batch.status = "in_progress"
        self.store.save_batch(batch)
        todo = [r for r in lines if r.custom_id not in ok and r.custom_id not in failed]
        if batch.status == "in_progress" and todo and not _expired(batch):
            log.info("batch running", batch=bid, todo=len(todo), total=len(lines))
            await self._drain(batch, todo)
        self._finish(bid, lines)

    async def _drain(self, batch: Batch, todo: list[protocol.BatchRequestInput]) -> None:
        bid = batch.id
        running: set[asyncio.Task[None]] = set()
        saver = _Throttle(1.0)
        self._queued[bid] = len(todo)
        checked = 0.0
        try:
            for req in todo:
                while True:
                    if time.monotonic() - checked > 1.0 or bid in self._cancel:
                        checked = time.monotonic()
                        if self._stopping(bid):
                            return
                    if self.in_flight < self.max_in_flight and self.has_room():
                        break
                    await asyncio.sleep(0.05)
                self.in_flight += 1
                self._queued[bid] -= 1
                task = asyncio.create_task(self._one(batch, req, saver))
                running.add(task)
                task.add_done_callback(running.discard)
            while running:
                await asyncio.wait(running, timeout=1.0)
                if self._stopping(bid):
                    return
        finally:
            for task in running:  # cancelled: the engine aborts what it was generating
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            self._queued[bid] = 0

    async def _one(self, batch: Batch, req: protocol.BatchRequestInput, saver: _Throttle) -> None:
        try:
            if req.body.get("stream"):
                status, body = 400, _error(400, "stream is not supported in a batch", "stream")
            else:
                payload = json.dumps(req.body).encode()
                while True:
                    status, body = await self.call(req.url, payload)
                    if status not in TRANSIENT:
                        break
                    self.metrics.retried.inc()
                    await asyncio.sleep(self.retry_delay)
            doc = _json(body)
            if status == 200:
                self.store.append_result(batch.id, "output", protocol.success(req.custom_id, doc))
                batch.request_counts.completed += 1
                self.metrics.finished.labels("completed").inc()
                usage = doc.get("usage") or {}
                self.metrics.tokens.labels("prompt").inc(usage.get("prompt_tokens", 0))
                self.metrics.tokens.labels("completion").inc(usage.get("completion_tokens", 0))
            else:
                line = protocol.success(req.custom_id, doc, status)
                self.store.append_result(batch.id, "errors", line)
                batch.request_counts.failed += 1
                self.metrics.finished.labels("failed").inc()
            if saver.due():
                self._save_counts(batch)
        finally:
            self.in_flight -= 1

    def _save_counts(self, batch: Batch) -> None:
        """The counts onto the record as it is now on disk (a cancel may have changed it)."""
        current = self.store.get_batch(batch.id)
        if current is not None:
            current.request_counts = batch.request_counts
            self.store.save_batch(current)

    def _finish(self, bid: str, lines: list[protocol.BatchRequestInput]) -> None:
        batch = self.store.get_batch(bid)
        if batch is None:
            return
        ok, failed = self.store.answered(bid)
        batch.request_counts.completed, batch.request_counts.failed = len(ok), len(failed)
        all_answered = len(ok) + len(failed) >= batch.request_counts.total
        now = int(time.time())
        if batch.status == "cancelling" or bid in self._cancel:
            batch.status, batch.cancelled_at = "cancelled", now
        elif batch.expired_at is not None or (_expired(batch) and not all_answered):
            answered = ok | failed
            self._expire(batch, [r for r in lines if r.custom_id not in answered])
            batch.status = "expired"
        elif all_answered:
            batch.finalizing_at = batch.finalizing_at or now
            batch.status, batch.completed_at = "completed", now
        else:
            return  # stopped early (shutdown): resumed by the next poll or the next router
        self.store.publish_results(batch)
        self.store.save_batch(batch)
        self._cancel.discard(bid)
        log.info(
            "batch finished", batch=bid, status=batch.status, **batch.request_counts.model_dump()
        )

    def _expire(self, batch: Batch, unanswered: list[protocol.BatchRequestInput]) -> None:
        """An error line for each request without an answer, after marking the batch as being
        expired (so that a restart halfway through carries on here)."""
        if batch.expired_at is None:
            batch.expired_at = int(time.time())
            batch.status, batch.finalizing_at = "finalizing", batch.expired_at
            self.store.save_batch(batch)
        for req in unanswered:
            line = protocol.BatchRequestOutput(
                id=protocol.new_id("batch_req"),
                custom_id=req.custom_id,
                response=None,
                error=EXPIRED,
            )
            self.store.append_result(batch.id, "errors", line.model_dump_json())
            batch.request_counts.failed += 1
            self.metrics.finished.labels("expired").inc()


def _expired(batch: Batch) -> bool:
    """The batch's completion window has closed."""
    return batch.expired_at is not None or (
        batch.expires_at is not None and time.time() >= batch.expires_at
    )


class _Throttle:
    def __init__(self, every: float):
        self.every, self.last = every, 0.0

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            return True
        return False


def _json(body: bytes) -> dict[str, Any]:
    with contextlib.suppress(ValueError):
        doc = json.loads(body)
        if isinstance(doc, dict):
            return doc
    return {"error": {"message": body.decode(errors="replace")[:500], "type": "server_error"}}


def _error(status: int, message: str, param: str | None) -> bytes:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return json.dumps(
        {"error": {"message": message, "type": kind, "param": param, "code": "invalid_value"}}
    ).encode()
