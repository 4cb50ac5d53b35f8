"""How many drafts each sequence verifies this step: a pure function of a cost model and the
acceptance each sequence has shown.

A step's time is modelled as c0 + c1 * n + cv * v for n tokens in the forward pass and v
sequences verifying drafts (weights read once, per-token work, and what a verifying sequence
costs besides its rows: it leaves the batched decode path for the chunked one, with its own
attention call per layer), fitted online from the engine's own steps. Draft j of a sequence
whose drafts are accepted with probability alpha adds alpha**j expected tokens (all j - 1 before
it must be accepted too) and one token of work; its first draft also costs cv. Drafts are added
best first while they raise the batch's expected tokens per second, so at large batches or low
acceptance none are: turning speculation on costs a workload at most the lookups.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass


@dataclass
class StepCostModel:
    """Least squares of step time on step tokens and verifying sequences, exponentially
    weighted toward recent steps. While the two do not vary independently (every verify step
    with the same number of drafts, say) the split between them is unknown: cv stays 0 and
    c1 carries both, which prices the usual bundle right."""

    c0: float = 0.02  # seconds per step before the first step is seen
    c1: float = 0.0005  # seconds per token
    cv: float = 0.0  # seconds per verifying sequence, besides its tokens
    decay: float = 0.98
    _w: float = 0.0
    _x: float = 0.0
    _v: float = 0.0
    _y: float = 0.0
    _xx: float = 0.0
    _xv: float = 0.0
    _vv: float = 0.0
    _xy: float = 0.0
    _vy: float = 0.0

    def observe(self, num_tokens: int, seconds: float, num_verifying: int = 0) -> None:
        d = self.decay
        x, v, y = float(num_tokens), float(num_verifying), seconds
        self._w = d * self._w + 1.0
        self._x = d * self._x + x
        self._v = d * self._v + v
        self._y = d * self._y + y
        self._xx = d * self._xx + x * x
        self._xv = d * self._xv + x * v
        self._vv = d * self._vv + v * v
        self._xy = d * self._xy + x * y
        self._vy = d * self._vy + v * y
        w = self._w
        mx, mv, my = self._x / w, self._v / w, self._y / w
        sxx = self._xx / w - mx * mx
        sxv = self._xv / w - mx * mv
        svv = self._vv / w - mv * mv
        sxy = self._xy / w - mx * my
        svy = self._vy / w - mv * my
        det = sxx * svv - sxv * sxv
        if w > 6 and svv > 0.01 and det > 0.05 * sxx * svv:
            c1 = (sxy * svv - svy * sxv) / det
            cv = (svy * sxx - sxy * sxv) / det
            if c1 > 0 and cv >= 0:
                self.c1, self.cv = c1, cv
                self.c0 = max(my - c1 * mx - cv * mv, 1e-6)
                return
        self.cv = 0.0
        if sxx > 0.25 and w > 4:
            # Noise can make the slope negative; a token is never free.
            self.c1 = max(sxy / sxx, 1e-6)
        # One batch size seen so far: keep the slope, move the intercept to fit the mean.
        self.c0 = max(my - self.c1 * mx, 1e-6)


def _opening(alpha: float, available: int, cost: float, cv: float) -> tuple[float, int, float]:
    """A sequence's best first bundle of drafts: (expected tokens per second of it, how many
    drafts, its expected tokens). With a cost per verifying sequence (cv) one draft may not pay
    where three do; without one, the best bundle is the first draft alone."""
    best = (0.0, 0, 0.0)
    gain = 0.0
    for j in range(1, available + 1):
        gain += alpha**j
        rate = gain / (cv + j * cost)
        if rate > best[0]:
            best = (rate, j, gain)
    return best


def plan_drafts(
    available: list[int],
    alphas: list[float],
    base_tokens: int,
    c0: float,
    c1: float,
    draft_cost: float = 0.0,
    cv: float = 0.0,
) -> list[int]:
    """Drafts to verify per sequence.

    available[i]: drafts sequence i could verify (0 when it is not decoding or has none);
    alphas[i]: its estimated per-draft acceptance; base_tokens: the step's tokens without drafts;
    draft_cost: seconds a draft costs to propose (a draft model's step), besides c1 to verify;
    cv: seconds a sequence costs for verifying at all, besides its drafts' tokens."""
    plan = [0] * len(available)
    decoding = sum(1 for a in available if a > 0)
    if not decoding:
        return plan
    tokens = float(decoding)  # expected tokens out of the step, one per decoding sequence
    seconds = c0 + c1 * base_tokens
    cost = c1 + draft_cost
    # Max-heap of (-tokens per second of the move, sequence, drafts, gain, seconds): a move is a
    # sequence's first bundle, then one more draft at a time (draft j gains alpha ** j).
    heap = []
    for i, a in enumerate(available):
        if a > 0 and alphas[i] > 0:
            rate, j, gain = _opening(alphas[i], a, cost, cv)
            heap.append((-rate, i, j, gain, cv + j * cost))
    heapq.heapify(heap)
    while heap:
        _, i, j, gain, spent = heapq.heappop(heap)
        # Worth it while the move's tokens per second beat the step's (best first: once the
        # best does not, none does, and the step's rate only rises as moves are taken).
        if gain * seconds <= tokens * spent:
            break
        plan[i] += j
        tokens += gain
        seconds += spent
        if plan[i] < available[i]:
            nxt = alphas[i] ** (plan[i] + 1)
            heapq.heappush(heap, (-nxt / cost, i, 1, nxt, cost))
    return plan


@dataclass
class AcceptanceEstimate:
    """A sequence's per-draft acceptance, from the accepted prefixes it has had: with accepted
    drafts a out of k, a successes and (a < k) failures (a truncated geometric's counts), both
    decayed so the estimate follows the text."""

    accepted: float
    rejected: float
    decay: float = 0.7
    verified: int = 0  # verify steps of this sequence so far

    @property
    def alpha(self) -> float:
        total = self.accepted + self.rejected
        return self.accepted / total if total > 0 else 0.0

    def update(self, num_drafts: int, num_accepted: int) -> None:
        self.accepted = self.decay * self.accepted + num_accepted
        self.rejected = self.decay * self.rejected + (1.0 if num_accepted < num_drafts else 0.0)
        self.verified += 1


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a verify step of k drafts emits on average (1 + alpha + ... + alpha**k)."""
    if math.isclose(alpha, 1.0):
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)
