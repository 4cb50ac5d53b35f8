"""The operator-wide loop that runs the autoscaler and the rollouts (`controller.sweep`), on fake
services and evaluations: every service evaluated each interval, never more than `concurrency` at
once, a slow one delaying only itself, a departed one forgotten, and a stop that waits for the
evaluations in flight."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

from kvpilot_operator.controller.sweep import Key, Sweep


class Recorder:
    def __init__(self, slow: set[Key] = frozenset(), delay: float = 0.0) -> None:
        self.calls: Counter[Key] = Counter()  # evaluations that completed
        self.attempts: Counter[Key] = Counter()
        self.forgotten: list[Key] = []
        self.slow, self.delay = slow, delay
        self.running = self.most = 0
        self.lock = threading.Lock()

    def evaluate(self, key: Key, value: object) -> None:
        with self.lock:
            self.running += 1
            self.attempts[key] += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(1.0 if key in self.slow else self.delay)
            if value == "bad":
                raise RuntimeError("an evaluation that fails")
            self.calls[key] += 1
        finally:
            with self.lock:
                self.running -= 1

    def forget(self, key: Key) -> None:
        self.forgotten.append(key)


def run_for(sweep: Sweep, services: dict[Key, object], seconds: float, change=None) -> float:
    """Run the sweep for `seconds` (calling `change(services)` half way); the time its stop took."""

    async def main() -> float:
        stopped = asyncio.Event()
        task = asyncio.create_task(sweep.run(lambda: dict(services), stopped))
        await asyncio.sleep(seconds / 2)
        if change is not None:
            change(services)
        await asyncio.sleep(seconds / 2)
        t0 = time.monotonic()
        stopped.set()
        await task
        return time.monotonic() - t0

    return asyncio.run(main())


def test_every_service_each_interval_with_bounded_concurrency() -> None:
    rec = Recorder(delay=0.02)
    services: dict[Key, object] = {("ns", f"s{i}"): {} for i in range(40)}
    sweep = Sweep("test", 0.1, rec.evaluate, rec.forget, concurrency=4)
    run_for(sweep, services, 0.8)
    assert set(rec.calls) == set(services)
    # 40 evaluations of 20 ms, 4 at a time: 0.2 s a round, then 0.1 s apart.
    assert all(n >= 2 for n in rec.calls.values()), rec.calls
    assert rec.most == 4


def test_a_slow_or_failing_service_delays_only_itself() -> None:
    slow = ("ns", "slow")
    rec = Recorder(slow={slow})
    services: dict[Key, object] = {slow: {}, ("ns", "bad"): "bad", ("ns", "a"): {}, ("ns", "b"): {}}
    sweep = Sweep("test", 0.1, rec.evaluate, rec.forget, concurrency=2)
    stop_took = run_for(sweep, services, 0.6)
    assert rec.calls[("ns", "a")] >= 3 and rec.calls[("ns", "b")] >= 3
    # Raised every time, and was evaluated again all the same.
    assert rec.calls[("ns", "bad")] == 0 and rec.attempts[("ns", "bad")] >= 3
    # The slow one was started once, and the stop waited (within DRAIN_S) for it to end.
    assert rec.attempts[slow] == 1 and rec.calls[slow] == 1
    assert 0.2 < stop_took < 1.0


def test_a_service_that_leaves_is_forgotten_once_not_in_flight() -> None:
    rec = Recorder(delay=0.01)
    services: dict[Key, object] = {("ns", "stays"): {}, ("ns", "goes"): {}}
    sweep = Sweep("test", 0.05, rec.evaluate, rec.forget)
    run_for(sweep, services, 0.5, change=lambda s: s.pop(("ns", "goes")))
    assert rec.forgotten == [("ns", "goes")]
    before = rec.calls[("ns", "goes")]
    assert before >= 1 and rec.calls[("ns", "stays")] > before
