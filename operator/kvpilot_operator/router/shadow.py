"""Shadow mirroring: a sample of user requests is also sent to the shadow revision, in the
background, and the two answers are compared.

The user's path only decides whether to mirror and starts a task: nothing there awaits the shadow,
and every failure of the shadow is caught and counted here. Greedy requests (temperature 0 or
top_k 1) must agree exactly; sampled ones are scored by token overlap F1 (whitespace tokens,
as multisets), which is 1 for identical text and 0 for nothing in common.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import structlog

from kvpilot_operator.router.metrics import RouterMetrics
from kvpilot_operator.router.sse import ResponseReader
from kvpilot_operator.router.table import EndpointState, RouteTable

log = structlog.get_logger("kvpilot.router.shadow")

DEFAULT_SHADOW_TIMEOUT = 120.0
DEFAULT_SHADOW_CONCURRENCY = 64


@dataclass
class Outcome:
    """One side's answer. Times run from its own upstream send, so that queueing in the router
    does not count against the primary."""

    status: int
    texts: dict[int, str] | None
    e2e: float
    ttft: float | None


def overlap_f1(a: str, b: str) -> float:
    ta, tb = Counter(a.split()), Counter(b.split())
    if not ta and not tb:
        return 1.0
    common = sum((ta & tb).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(tb.values()), common / sum(ta.values())
    return 2 * precision * recall / (precision + recall)


def agreement(primary: dict[int, str], shadow: dict[int, str]) -> tuple[bool, float]:
    """(exactly equal, mean F1 over the choices either side produced)."""
    indices = sorted(primary.keys() | shadow.keys()) or [0]
    f1 = sum(overlap_f1(primary.get(i, ""), shadow.get(i, "")) for i in indices) / len(indices)
    return primary == shadow, f1


class TokenBucket:
    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.capacity = max(1.0, rate)  # a one-second burst
        self.tokens = self.capacity
        self.clock = clock
        self.last = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


@dataclass
class ShadowSummary:
    """Rolling figures for /router/state (the metrics hold the full record)."""

    mirrored: int = 0
    results: Counter[str] = field(default_factory=Counter)
    compared: int = 0
    greedy_compared: int = 0
    greedy_exact: int = 0
    overlaps: deque[float] = field(default_factory=lambda: deque(maxlen=1024))
    latency_deltas: deque[float] = field(default_factory=lambda: deque(maxlen=1024))

    def to_dict(self) -> dict[str, Any]:
        return {
            "mirrored": self.mirrored,
            "results": dict(self.results),
            "compared": self.compared,
            "greedyCompared": self.greedy_compared,
            "greedyExactMatchRate": (
                self.greedy_exact / self.greedy_compared if self.greedy_compared else None
            ),
            "meanOverlap": statistics.fmean(self.overlaps) if self.overlaps else None,
            "p50LatencyDeltaSeconds": (
                statistics.median(self.latency_deltas) if self.latency_deltas else None
            ),
        }


@dataclass(frozen=True)
class ShadowTarget:
    """Where a request's copy goes when not to the shadow revision: an adapter's shadow version
    on the primary's engines (`place` finds an engine and the body naming the version there)."""

    label: str  # the shadow series' `revision` label: `<adapter>@shadow`
    mirror_percent: float
    max_rps: float | None
    place: Callable[[], Awaitable[tuple[EndpointState, bytes] | None]]


class Mirror:
    def __init__(
        self,
        table: RouteTable,
        client: httpx.AsyncClient,
        metrics: RouterMetrics,
        timeout: float = DEFAULT_SHADOW_TIMEOUT,
        max_concurrency: int = DEFAULT_SHADOW_CONCURRENCY,
    ):
        self.table, self.client, self.metrics = table, client, metrics
        self.timeout, self.max_concurrency = timeout, max_concurrency
        self.active = 0
        self.summary = ShadowSummary()
        # In 1/10000ths of a request, per shadow: sampling by counter, exact and cheap.
        self._credit: dict[str, int] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def start(
        self,
        path: str,
        body: bytes,
        headers: dict[str, str],
        greedy: bool,
        target: ShadowTarget | None = None,
    ) -> asyncio.Future[Outcome | None] | None:
        """Mirror this request if sampled (to `target`, else to the shadow revision); returns
        the future the primary's outcome goes into."""
        if target is not None:
            label, percent, max_rps = target.label, target.mirror_percent, target.max_rps
        else:
            shadow = self.table.config.shadow if self.table.config else None
            if shadow is None or not self.table.has_shadow():
                return None
            label, percent, max_rps = shadow.revision, shadow.mirror_percent, shadow.max_rps
        credit = self._credit.get(label, 0) + round(percent * 100)
        if credit < 10000:
            self._credit[label] = credit
            return None
        self._credit[label] = credit - 10000
        if max_rps is not None:
            bucket = self._buckets.get(label)
            if bucket is None or bucket.rate != max_rps:
                bucket = self._buckets[label] = TokenBucket(max_rps)
            if not bucket.take():
                self._count(label, "dropped_rate")
                return None
        if self.active >= self.max_concurrency:
            self._count(label, "dropped_busy")
            return None
        primary: asyncio.Future[Outcome | None] = asyncio.get_running_loop().create_future()
        self.active += 1
        self.summary.mirrored += 1
        place = target.place if target is not None else None
        task = asyncio.create_task(self._run(label, path, body, headers, greedy, primary, place))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return primary

    def _count(self, revision: str, result: str) -> None:
        self.metrics.shadow_requests.labels(revision, result).inc()
        self.summary.results[result] += 1

    async def _run(
        self,
        revision: str,
        path: str,
        body: bytes,
        headers: dict[str, str],
        greedy: bool,
        primary: asyncio.Future[Outcome | None],
        place: Callable[[], Awaitable[tuple[EndpointState, bytes] | None]] | None = None,
    ) -> None:
        try:
            try:
                outcome = await asyncio.wait_for(
                    self._send(path, body, headers, place), self.timeout
                )
            finally:
                self.active -= 1
            if outcome is None or outcome.status != 200:
                self._count(revision, "error")
                return
            self._count(revision, "ok")
            self._compare(revision, greedy, await primary, outcome)
        except (TimeoutError, asyncio.TimeoutError, httpx.TimeoutException):
            self._count(revision, "timeout")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the shadow must never hurt anyone: count it and move on
            self._count(revision, "error")
            log.debug("shadow request failed", error=repr(e))

    async def _send(
        self,
        path: str,
        body: bytes,
        headers: dict[str, str],
        place: Callable[[], Awaitable[tuple[EndpointState, bytes] | None]] | None = None,
    ) -> Outcome | None:
        if place is not None:
            placed = await place()
            if placed is None:
                return None
            st, body = placed
            headers = {**headers, "content-length": str(len(body))}
        else:
            st = self.table.pick_shadow()
        if st is None:
            return None
        self.table.acquire(st)
        t0 = time.perf_counter()
        try:
            request = self.client.build_request(
                "POST", st.url + path, content=body, headers={**headers, "x-kvpilot-shadow": "1"}
            )
            try:
                resp = await self.client.send(request, stream=True)
            except httpx.ConnectError:
                self.table.eject(st.url)
                raise
            try:
                reader = ResponseReader(
                    resp.headers.get("content-type", "").startswith("text/event-stream"), True
                )
                async for chunk in resp.aiter_raw():
                    reader.feed(chunk, time.perf_counter())
            finally:
                await resp.aclose()
            ttft = None if reader.first_text is None else reader.first_text - t0
            return Outcome(resp.status_code, reader.texts(), time.perf_counter() - t0, ttft)
        finally:
            self.table.release(st)

    def _compare(
        self, revision: str, greedy: bool, primary: Outcome | None, shadow: Outcome
    ) -> None:
        if primary is None or primary.status != 200 or primary.texts is None:
            return
        if shadow.texts is None:
            return
        exact, f1 = agreement(primary.texts, shadow.texts)
        m, s = self.metrics, self.summary
        m.shadow_compared.labels(revision, "greedy" if greedy else "sampled").inc()
        m.shadow_overlap.observe(f1)
        s.compared += 1
        s.overlaps.append(f1)
        if greedy:
            s.greedy_compared += 1
            if exact:
                s.greedy_exact += 1
                m.shadow_exact.labels(revision).inc()
        delta = shadow.e2e - primary.e2e
        m.shadow_latency_delta.observe(delta)
        s.latency_deltas.append(delta)
        if primary.ttft is not None and shadow.ttft is not None:
            m.shadow_ttft_delta.observe(shadow.ttft - primary.ttft)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
