"""Deadline-aware scaling for the Batch API: enough replicas to finish the batch backlog before
the nearest completion window closes.

A pure function, like `decision.decide`: no I/O, no clock. The SLO decision sizes the service
for its interactive traffic; batches fill the capacity that leaves idle. When the rate batches
have been finishing at (measured with the replicas serving now) would not clear the backlog in
the time left, with a safety margin, this asks for the replicas that would, within
`max_replicas`; the larger of the two answers wins. A batch-only service (no interactive
traffic) scales from zero on a backlog and, once the queue is empty, goes back to the SLO
decision's idle scale-to-zero.

`batches_status` is the same figures as the LLMService's `status.batches`.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field, replace
from typing import Any

from kvpilot_operator.autoscaler.decision import Decision

# Aim to finish this much before the window closes: rates drift, and replicas take time to start.
DEFAULT_SAFETY = 1.25
# Below this many seconds left the window is treated as closing now (no division blow-up).
MIN_SECONDS_LEFT = 60.0


@dataclass(frozen=True)
class BatchBacklog:
    requests: float  # unanswered batch requests (queued and running), over all active batches
    seconds_left: float | None  # until the nearest active batch's window closes; None: none
    finish_rate: float | None  # batch requests answered per second lately; None: no data yet


@dataclass(frozen=True)
class BatchFigures:
    """What a service's routers report about its batches (`kvpilot_batch_*`)."""

    by_status: dict[str, int] = field(default_factory=dict)
    total: int = 0  # requests in the active batches
    completed: int = 0
    failed: int = 0
    backlog: float = 0.0  # unanswered requests the routers are working on (queued and running)
    deadline_at: float | None = None  # Unix time the nearest active window closes
    finish_rate: float | None = None  # batch requests answered per second lately

    def backlog_at(self, now: float) -> BatchBacklog | None:
        """The deadline decision's input at Unix time `now` (None: no backlog)."""
        if not self.backlog:
            return None
        left = None if self.deadline_at is None else self.deadline_at - now
        return BatchBacklog(self.backlog, left, self.finish_rate)


def batches_status(figures: BatchFigures, now: float) -> dict[str, Any]:
    """status.batches (camelCase, as written): counts, rate, the nearest deadline as a time (so
    that it does not change between evaluations) and whether the rate would miss it."""
    active = sum(n for s, n in figures.by_status.items() if s in _ACTIVE)
    out: dict[str, Any] = {
        "active": active,
        "byStatus": {s: n for s, n in sorted(figures.by_status.items()) if n} or None,
        "requestsTotal": figures.total,
        "requestsCompleted": figures.completed,
        "requestsFailed": figures.failed,
        "finishRate": None if figures.finish_rate is None else round(figures.finish_rate, 2),
        "nearestDeadline": None,
        "deadlineAtRisk": None,
    }
    if figures.deadline_at is not None and active:
        out["nearestDeadline"] = (
            dt.datetime.fromtimestamp(figures.deadline_at, dt.timezone.utc)
            .replace(microsecond=0)
            .strftime("%Y-%m-%dT%H:%M:%SZ")
        )
        pending = max(figures.total - figures.completed - figures.failed, figures.backlog)
        if not pending:
            out["deadlineAtRisk"] = False
        elif figures.finish_rate:
            out["deadlineAtRisk"] = now + pending / figures.finish_rate > figures.deadline_at
    return out


# The Batch API's statuses of a batch still at work.
_ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")


@dataclass(frozen=True)
class DeadlineAdvice:
    replicas: int  # what the deadline needs (0: nothing to ask for)
    reason: str


def deadline_replicas(
    backlog: BatchBacklog,
    ready: int,
    max_replicas: int,
    safety: float = DEFAULT_SAFETY,
) -> DeadlineAdvice:
    """Replicas the batch backlog needs to meet its deadline, given `ready` serving replicas."""
    if backlog.requests <= 0 or backlog.seconds_left is None:
        return DeadlineAdvice(0, "no batch backlog")
    if ready == 0:
        # Nothing serves: one replica to start on it (and to measure a rate from).
        return DeadlineAdvice(min(1, max_replicas), "batch backlog with no replica serving")
    if not backlog.finish_rate or backlog.finish_rate <= 0:
        return DeadlineAdvice(0, "batch backlog, no finish rate measured yet: hold")
    left = max(backlog.seconds_left, MIN_SECONDS_LEFT)
    needed_rate = backlog.requests * safety / left
    per_replica = backlog.finish_rate / ready
    replicas = math.ceil(needed_rate / per_replica - 1e-9)
    eta = backlog.requests / backlog.finish_rate
    if replicas <= ready:
        return DeadlineAdvice(
            replicas,
            f"batch backlog of {backlog.requests:.0f} finishes in ~{eta:.0f}s, "
            f"{backlog.seconds_left:.0f}s left",
        )
    capped = min(replicas, max_replicas)
    why = (
        f"batch backlog of {backlog.requests:.0f} at {backlog.finish_rate:.2f}/s "
        f"needs ~{eta:.0f}s, "
        f"{backlog.seconds_left:.0f}s left: {replicas} replicas"
    )
    if capped < replicas:
        why += f", capped at maxReplicas {max_replicas} (the deadline will be missed)"
    return DeadlineAdvice(capped, why)


def with_deadline(
    decision: Decision, backlog: BatchBacklog | None, ready: int, max_replicas: int
) -> Decision:
    """The SLO decision, raised to what the batch deadline needs when that is more."""
    if backlog is None:
        return decision
    advice = deadline_replicas(backlog, ready, max_replicas)
    if advice.replicas <= decision.desired:
        return decision
    return replace(decision, desired=advice.replicas, reason=advice.reason)
