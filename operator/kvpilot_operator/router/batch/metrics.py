"""`kvpilot_batch_*`: the Batch API's work, in the router's registry.

The backlog (`kvpilot_batch_requests{state="queued"}`) and the nearest deadline
(`kvpilot_batch_deadline_seconds`) are what the autoscaler reads to finish batches in time.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class BatchMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.requests = Gauge(
            "kvpilot_batch_requests",
            "Batch requests not yet answered, by state: queued (waiting for room on the engines) "
            "or running (sent).",
            ["state"],
            registry=registry,
        )
        self.finished = Counter(
            "kvpilot_batch_requests_finished_total",
            "Batch requests answered, by result: completed (200), failed (an error line) or "
            "expired (its batch's completion window closed first).",
            ["result"],
            registry=registry,
        )
        self.limit = Gauge(
            "kvpilot_batch_admission_limit",
            "Batch requests the router lets be in flight now: lowered while interactive latency "
            "nears the service's SLO, raised while it is far under it.",
            registry=registry,
        )
        self.retried = Counter(
            "kvpilot_batch_requests_retried_total",
            "Batch requests sent again after a transient failure (no endpoint, 5xx, overloaded).",
            registry=registry,
        )
        self.tokens = Counter(
            "kvpilot_batch_tokens_total",
            "Tokens processed for batch requests, by kind: prompt or completion.",
            ["kind"],
            registry=registry,
        )
        self.batches = Gauge(
            "kvpilot_batch_batches",
            "Batches this router knows, by status (validating, in_progress, completed, ...).",
            ["status"],
            registry=registry,
        )
        self.deadline = Gauge(
            "kvpilot_batch_deadline_seconds",
            "Seconds until the nearest active batch's completion window closes (0 with none).",
            registry=registry,
        )
        self.deadline_at = Gauge(
            "kvpilot_batch_deadline_timestamp_seconds",
            "When the nearest active batch's completion window closes, Unix time (0 with none).",
            registry=registry,
        )
        self.active_requests = Gauge(
            "kvpilot_batch_active_requests",
            "The active batches' request counts, summed, by state: total, completed, failed.",
            ["state"],
            registry=registry,
        )
        for state in ("queued", "running"):
            self.requests.labels(state)
        for state in ("total", "completed", "failed"):
            self.active_requests.labels(state)
        for result in ("completed", "failed", "expired"):
            self.finished.labels(result)
        for kind in ("prompt", "completion"):
            self.tokens.labels(kind)
