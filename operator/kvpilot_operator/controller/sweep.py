"""One operator-wide loop that evaluates every service of a kind each interval: how the autoscaler
and the rollouts run, instead of a kopf daemon per LLMService.

A kopf daemon holds one of kopf's worker threads for its object's whole life (past eight services
no handler gets a thread, and new LLMServices are never reconciled), and kopf puts a finalizer on
every object with a daemon (so deleting one hangs while the operator is down). A `Sweep` holds
neither: it reads the services from a kopf index, evaluates each one `interval` seconds after its
last evaluation ended, at most `concurrency` at a time on a thread pool of its own (the
evaluations are synchronous: the Kubernetes and Prometheus clients), and forgets a service that
has left the index. One slow service delays only itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("kvpilot.sweep")

Key = tuple[str, str]  # (namespace, name)

# The longest the loop sleeps without looking at the index: how late a new service may start.
MAX_NAP_S = 1.0
# On stop, how long evaluations in flight get to finish before the loop returns without them.
DRAIN_S = 10.0


@dataclass
class Sweep:
    """`evaluate(key, value)` runs on the pool for each service that `services()` returns (key ->
    the index's value); `forget(key)` runs on the event loop once a service has left it and no
    evaluation of it is in flight. Both are the caller's: per-service state lives there."""

    name: str
    interval: float
    evaluate: Callable[[Key, Any], None]
    forget: Callable[[Key], None]
    concurrency: int = 8
    clock: Callable[[], float] = time.monotonic

    async def run(self, services: Callable[[], Mapping[Key, Any]], stopped: asyncio.Event) -> None:
        """Until `stopped` is set (noticed within MAX_NAP_S); then waits up to DRAIN_S for the
        evaluations in flight."""
        loop = asyncio.get_running_loop()
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix=f"kvpilot-{self.name}")
        due: dict[Key, float] = {}  # known services -> when next to evaluate them
        inflight: dict[Key, asyncio.Future[None]] = {}
        woken = asyncio.Event()  # an evaluation ended: its service's next due time is set

        def ended(key: Key) -> None:
            inflight.pop(key, None)
            due[key] = self.clock() + self.interval
            woken.set()

        try:
            while not stopped.is_set():
                current = services()
                for key in [k for k in due if k not in current and k not in inflight]:
                    del due[key]
                    self._forget(key)
                now = self.clock()
                for key, value in current.items():
                    if key in inflight or due.setdefault(key, now) > now:
                        continue
                    fut = loop.run_in_executor(pool, self._evaluate, key, value)
                    inflight[key] = fut
                    fut.add_done_callback(lambda _, key=key: ended(key))
                waiting = [t for k, t in due.items() if k not in inflight]
                nap = min([MAX_NAP_S, *(t - self.clock() for t in waiting)])
                woken.clear()  # callbacks run only while this coroutine awaits: none is missed
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(woken.wait(), timeout=max(nap, 0.01))
        finally:
            if inflight:
                await asyncio.wait(list(inflight.values()), timeout=DRAIN_S)
            pool.shutdown(wait=False, cancel_futures=True)

    def _evaluate(self, key: Key, value: Any) -> None:
        try:
            self.evaluate(key, value)
        except Exception:  # one bad evaluation must not end the loop, nor the others
            log.exception("%s evaluation failed for %s/%s", self.name, *key)

    def _forget(self, key: Key) -> None:
        try:
            self.forget(key)
        except Exception:
            log.exception("%s: forgetting %s/%s failed", self.name, *key)
