"""A Batch API batch in `kvpilot autoscale simulate`: a backlog drained in the capacity the
interactive load leaves idle, against a completion window.

The router meters batch requests into the engines only while they have room, so in the model a
batch gets each second what the ready replicas can still do after the interactive tokens, up to
`per_replica` tokens/s each (the simulation passes what a replica sustains at the TPOT target:
the batch fills idle capacity, not the interactive requests' step time). The deadline decision
(`deadline.with_deadline`) sees what the operator reads from Prometheus: the unanswered
requests, the seconds left, the rate requests finished at over the seconds of the last five
minutes that had batch work, and the replicas ready meanwhile.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvpilot_operator.autoscaler.deadline import BatchBacklog

RATE_WINDOW = 300  # seconds: the `[5m]` of the operator's finish-rate query


@dataclass(frozen=True)
class BatchJob:
    """`requests` requests of `input_len` + `output_len` tokens submitted at `start` seconds,
    due `window` seconds later."""

    requests: int
    window: float
    start: float = 0.0
    input_len: float = 200.0
    output_len: float = 200.0


@dataclass
class BatchQueue:
    job: BatchJob
    per_replica: float  # tokens/s of batch work a replica takes, interactive tokens included
    left: float = field(init=False)
    finished_at: float | None = None
    # (requests answered, replicas ready) for each second with batch work, the last five minutes
    _recent: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=RATE_WINDOW))

    def __post_init__(self) -> None:
        self.left = float(self.job.requests)

    @property
    def due(self) -> float:
        return self.job.start + self.job.window

    def tick(self, now: float, ready: int, interactive: float) -> float:
        """One second: the tokens/s the batch gets from `ready` replicas after `interactive`
        tokens/s."""
        if now < self.job.start or self.left <= 0:
            return 0.0
        per_request = self.job.input_len + self.job.output_len
        spare = max(0.0, ready * self.per_replica - interactive)
        done = min(self.left, spare / per_request)
        self.left -= done
        self._recent.append((done, ready))
        if self.left <= 1e-9:
            self.left, self.finished_at = 0.0, now + 1.0
        return done * per_request

    def backlog(self, now: float) -> BatchBacklog | None:
        """What the routers' series say at `now` (None: no batch at work)."""
        if now < self.job.start or self.left <= 0:
            return None
        # The window holds the seconds with work only: the backlog is never empty in between.
        busy = len(self._recent)
        if busy < 10:  # prometheus.MIN_BUSY_S
            return BatchBacklog(self.left, self.due - now, None)
        rate = sum(done for done, _ in self._recent) / busy
        replicas = sum(ready for _, ready in self._recent) / busy
        tokens = self.job.input_len + self.job.output_len
        return BatchBacklog(self.left, self.due - now, rate or None, replicas or None, tokens)

    def summary(self) -> str:
        due = self.due / 60
        return f"batch              {self.job.requests} requests, due at {due:.1f} min: " + (
            self.outcome()
        )

    def outcome(self) -> str:
        """When the batch finished against its window, or how much was left."""
        if self.finished_at is None:
            return f"NOT finished, {self.left:.0f} left at the end"
        spare = (self.due - self.finished_at) / 60
        verdict = f"{spare:.1f} min to spare" if spare >= 0 else f"{-spare:.1f} min LATE"
        return f"finished at {self.finished_at / 60:.1f} min ({verdict})"
