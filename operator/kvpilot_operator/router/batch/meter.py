"""How many batch requests may be in flight, from the interactive latency the router sees.

The engines' queue says when they are full, not when interactive requests have started to
slow: batch decodes share every step with interactive ones, so a step grows with each batch
request and TTFT and TPOT grow with it long before anything waits. The meter holds the
interactive latency under the service's SLO the way TCP holds a link under congestion
(additive increase, multiplicative decrease): every `interval_s` it takes the SLO's percentile
of the interactive TTFTs and TPOTs of the last `window_s`; above `back_off_at` of a target it
halves the batch limit, below `grow_below` of every target (or with no interactive traffic) it
adds one, in between it holds. It never goes below one request, so a batch always progresses;
finishing on time is the autoscaler's job (it adds replicas when the backlog will not make its
deadline), not the interactive traffic's.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass
class SLOTargets:
    """The service's interactive SLO, in seconds, at one percentile."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    percentile: float = 95.0

    @property
    def any(self) -> bool:
        return self.ttft_s is not None or self.tpot_s is not None


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class BatchMeter:
    max_limit: int
    slo: SLOTargets = field(default_factory=SLOTargets)
    window_s: float = 10.0
    interval_s: float = 1.0
    back_off_at: float = 0.8
    grow_below: float = 0.5
    # Starts low and grows: a batch that starts beside a busy interactive load must not send
    # `max_limit` requests before the first latency is seen.
    limit: float = 1.0
    _ttft: deque[tuple[float, float]] = field(default_factory=deque)
    _tpot: deque[tuple[float, float]] = field(default_factory=deque)
    _adjusted_at: float | None = None
    _backed_off_at: float = -math.inf

    def __post_init__(self) -> None:
        if not self.slo.any:
            self.limit = float(self.max_limit)  # nothing to hold: the engines' queue meters

    def observe(self, now: float, ttft_s: float | None = None, tpot_s: float | None = None) -> None:
        """An interactive request's latency (never a batch request's own)."""
        if ttft_s is not None:
            self._ttft.append((now, ttft_s))
        if tpot_s is not None:
            self._tpot.append((now, tpot_s))

    def current(self, now: float) -> int:
        """The limit on batch requests in flight now."""
        if not self.slo.any:
            return self.max_limit
        if self._adjusted_at is None:
            self._adjusted_at = now
        elif now - self._adjusted_at >= self.interval_s:
            self._adjusted_at = now
            self._adjust(now)
        return int(self.limit)

    def pressure(self, now: float, since: float = -math.inf) -> float | None:
        """The worst ratio of a percentile to its target over the window's samples taken after
        `since`; None with no such samples."""
        worst: float | None = None
        for samples, target in ((self._ttft, self.slo.ttft_s), (self._tpot, self.slo.tpot_s)):
            while samples and samples[0][0] < now - self.window_s:
                samples.popleft()
            recent = [v for t, v in samples if t > since]
            if target is None or not recent:
                continue
            ratio = percentile(recent, self.slo.percentile) / target
            worst = ratio if worst is None else max(worst, ratio)
        return worst

    def _adjust(self, now: float) -> None:
        # Latencies from before the last back-off were caused by the old limit: judging the
        # new one by them would halve it again for the same requests.
        ratio = self.pressure(now, since=self._backed_off_at)
        if ratio is not None and ratio > self.back_off_at:
            self.limit = max(1.0, math.floor(self.limit / 2))
            self._backed_off_at = now
        elif ratio is None and self.pressure(now) is not None:
            pass  # only latencies from before the back-off: wait for new ones
        elif ratio is None or ratio < self.grow_below:
            self.limit = min(float(self.max_limit), self.limit + 1.0)
