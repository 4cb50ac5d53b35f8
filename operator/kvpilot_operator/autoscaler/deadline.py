"""Deadline-aware scaling for the Batch API: enough replicas to finish the batch backlog before
the nearest completion window closes.

A pure function, like `decision.decide`: no I/O, no clock. The SLO decision sizes the service
for its interactive traffic; batches fill the capacity that leaves idle. When the rate batches
have been finishing at would not clear the backlog in the time left, with a safety margin, this
asks for the replicas that would, within `max_replicas`; the larger of the two answers wins.
The rate is measured over the time the routers had batch work (a rate over a window that began
before the batch would read low, and ask for every replica allowed the moment a batch starts),
with the replicas serving meanwhile. A replica added (or removed) adds (or removes) a whole
replica's batch throughput, its capacity at the SLO over the batch requests' tokens, since the
interactive load stays on the others: dividing the measured rate by the replicas instead would
count the interactive share against every new replica, and ask for every replica allowed when
the interactive load leaves little idle. Without a capacity fitted yet, that division it is.
A batch-only service (no interactive traffic) scales from zero on a backlog and, once the queue
is empty, goes back to the SLO decision's idle scale-to-zero.

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
    # The replicas serving while that rate was measured (average); None: the ready ones now.
    replicas: float | None = None
    tokens_per_request: float | None = None  # prompt and completion tokens of a batch request


@dataclass(frozen=True)
class BatchFigures:
    """What a service's routers report about its batches (`kvpilot_batch_*`)."""

    by_status: dict[str, int] = field(default_factory=dict)
    total: int = 0  # requests in the active batches
    completed: int = 0
    failed: int = 0
    backlog: float = 0.0  # unanswered requests the routers are working on (queued and running)
    deadline_at: float | None = None  # Unix time the nearest active window closes
    finish_rate: float | None = None  # batch requests answered per second of batch work lately
    replicas: float | None = None  # engine replicas up meanwhile (average)
    tokens_per_request: float | None = None

    def backlog_at(self, now: float) -> BatchBacklog | None:
        """The deadline decision's input at Unix time `now` (None: no backlog)."""
        if not self.backlog:
            return None
        left = None if self.deadline_at is None else self.deadline_at - now
        return BatchBacklog(
            self.backlog, left, self.finish_rate, self.replicas, self.tokens_per_request
        )


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
    replica_rate: float | None = None,
) -> DeadlineAdvice:
    """Replicas the batch backlog needs to meet its deadline, given `ready` serving replicas.
    `replica_rate`: batch requests/s one more replica would answer (None: unknown)."""
    if backlog.requests <= 0 or backlog.seconds_left is None:
        return DeadlineAdvice(0, "no batch backlog")
    if ready == 0:
        # Nothing serves: one replica to start on it (and to measure a rate from).
        return DeadlineAdvice(min(1, max_replicas), "batch backlog with no replica serving")
    if not backlog.finish_rate or backlog.finish_rate <= 0:
        return DeadlineAdvice(0, "batch backlog, no finish rate measured yet: hold")
    left = max(backlog.seconds_left, MIN_SECONDS_LEFT)
    needed_rate = backlog.requests * safety / left
    measured_with = backlog.replicas or ready
    if replica_rate and replica_rate > 0:
        current = max(backlog.finish_rate + (ready - measured_with) * replica_rate, 1e-9)
        replicas = max(1, ready + math.ceil((needed_rate - current) / replica_rate - 1e-9))
    else:
        current = backlog.finish_rate * ready / measured_with
        replicas = math.ceil(needed_rate / (current / ready) - 1e-9)
    eta = backlog.requests / current
    if replicas <= ready:
        return DeadlineAdvice(
            replicas,
            f"batch backlog of {backlog.requests:.0f} finishes in ~{eta:.0f}s, "
            f"{backlog.seconds_left:.0f}s left",
        )
    capped = min(replicas, max_replicas)
    why = (
        f"batch backlog of {backlog.requests:.0f} at {current:.2f}/s "
        f"needs ~{eta:.0f}s, "
        f"{backlog.seconds_left:.0f}s left: {replicas} replicas"
    )
    if capped < replicas:
        why += f", capped at maxReplicas {max_replicas} (the deadline will be missed)"
    return DeadlineAdvice(capped, why)


def with_deadline(
    decision: Decision,
    backlog: BatchBacklog | None,
    ready: int,
    max_replicas: int,
    utilization: float = 0.8,
) -> Decision:
    """The SLO decision, raised to what the batch deadline needs when that is more.
    `utilization`: the scaling's targetUtilization, the share of a replica's capacity at the SLO
    that batch work may fill.

    Fewer replicas than serve now only as far as twice the margin allows: the rates are
    estimates, and without the wider margin the replicas would go down and straight back up all
    through a batch."""
    if backlog is None:
        return decision
    rate = None  # a whole replica's batch requests/s at the decision's capacity
    if decision.capacity and backlog.tokens_per_request:
        rate = decision.capacity * utilization / backlog.tokens_per_request
    advice = deadline_replicas(backlog, ready, max_replicas, replica_rate=rate)
    if 0 < advice.replicas < ready:
        stricter = deadline_replicas(
            backlog, ready, max_replicas, safety=2 * DEFAULT_SAFETY, replica_rate=rate
        )
        if stricter.replicas > advice.replicas:
            advice = replace(stricter, replicas=min(stricter.replicas, ready))
    if advice.replicas <= decision.desired:
        return decision
    return replace(decision, desired=advice.replicas, reason=advice.reason)
