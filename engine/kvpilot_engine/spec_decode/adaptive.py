"""How many drafts each sequence verifies this step: a pure function of a cost model and the
acceptance each sequence has shown.

A step's time is modelled as c0 + c1 * n for n tokens in the forward pass (weights read once,
plus per-token work), fitted online from the engine's own steps. Draft j of a sequence whose
drafts are accepted with probability alpha adds alpha**j expected tokens (all j - 1 before it
must be accepted too) and one token of work. Drafts are added best first while they raise the
batch's expected tokens per second, so at large batches or low acceptance none are: turning
speculation on costs a workload at most the lookups.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass


@dataclass
class StepCostModel:
    """Least squares of step time on step tokens, exponentially weighted toward recent steps."""

    c0: float = 0.02  # seconds per step before the first step is seen
    c1: float = 0.0005  # seconds per token
    decay: float = 0.98
    _w: float = 0.0
    _x: float = 0.0
    _y: float = 0.0
    _xx: float = 0.0
    _xy: float = 0.0

    def observe(self, num_tokens: int, seconds: float) -> None:
        d = self.decay
        x, y = float(num_tokens), seconds
        self._w = d * self._w + 1.0
        self._x = d * self._x + x
        self._y = d * self._y + y
        self._xx = d * self._xx + x * x
        self._xy = d * self._xy + x * y
        mx, my = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mx * mx
        if var > 0.25 and self._w > 4:
            slope = (self._xy / self._w - mx * my) / var
            # Noise can make the slope negative; a token is never free.
            self.c1 = max(slope, 1e-6)
            self.c0 = max(my - self.c1 * mx, 1e-6)
        else:
            # One batch size seen so far: keep the slope, move the intercept to fit the mean.
            self.c0 = max(my - self.c1 * mx, 1e-6)


def plan_drafts(
    available: list[int],
    alphas: list[float],
    base_tokens: int,
    c0: float,
    c1: float,
    draft_cost: float = 0.0,
) -> list[int]:
    """Drafts to verify per sequence.

    available[i]: drafts sequence i could verify (0 when it is not decoding or has none);
    alphas[i]: its estimated per-draft acceptance; base_tokens: the step's tokens without drafts;
    draft_cost: seconds a draft costs to propose (a draft model's step), besides c1 to verify."""
    plan = [0] * len(available)
    decoding = sum(1 for a in available if a > 0)
    if not decoding:
        return plan
    tokens = float(decoding)  # expected tokens out of the step, one per decoding sequence
    seconds = c0 + c1 * base_tokens
    # Max-heap of (gain of the next draft, sequence): draft j of sequence i gains alpha_i ** j.
    heap = [(-alphas[i], i) for i, a in enumerate(available) if a > 0 and alphas[i] > 0]
    heapq.heapify(heap)
    cost = c1 + draft_cost
    while heap:
        neg_gain, i = heapq.heappop(heap)
        gain = -neg_gain
        # Worth it while the draft's tokens per second beat the step's.
        if gain * seconds <= tokens * cost:
            break
        plan[i] += 1
        tokens += gain
        seconds += cost
        if plan[i] < available[i]:
            heapq.heappush(heap, (-gain * alphas[i], i))
    return plan


@dataclass
class AcceptanceEstimate:
    """A sequence's per-draft acceptance, from the accepted prefixes it has had: with accepted
    drafts a out of k, a successes and (a < k) failures (a truncated geometric's counts), both
    decayed so the estimate follows the text."""

    accepted: float
    rejected: float
    decay: float = 0.7

    @property
    def alpha(self) -> float:
        total = self.accepted + self.rejected
        return self.accepted / total if total > 0 else 0.0

    def update(self, num_drafts: int, num_accepted: int) -> None:
        self.observe(num_accepted, num_accepted < num_drafts)

    def observe(self, num_accepted: int, rejected: bool) -> None:
        self.accepted = self.decay * self.accepted + num_accepted
        self.rejected = self.decay * self.rejected + (1.0 if rejected else 0.0)


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a verify step of k drafts emits on average (1 + alpha + ... + alpha**k)."""
    if math.isclose(alpha, 1.0):
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)
