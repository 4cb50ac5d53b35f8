"""The coalescing queue behind status refreshes: a burst of marks is handled once per key, with
the latest value, off the marking threads; a key marked while it is handled is handled again; a
failure does not stop the queue; before it runs, marks are refused so the caller acts itself."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from kvpilot_operator.controller.coalesce import Coalescer


def test_marks_coalesce_per_key_and_keep_the_latest_value() -> None:
    handled: list[tuple[Any, Any]] = []
    gate = threading.Event()

    def handle(key: Any, value: Any) -> None:
        if key == ("ns", "slow") and not gate.is_set():
            gate.set()
            time.sleep(0.3)  # marked again meanwhile: handled again after
        if key == ("ns", "bad"):
            raise RuntimeError("boom")
        handled.append((key, value))

    queue = Coalescer("test", handle, delay=0.05, concurrency=2)
    assert not queue.mark(("ns", "a"))  # not running: the caller handles it itself

    async def main() -> None:
        stopped = asyncio.Event()
        task = asyncio.create_task(queue.run(stopped))
        await asyncio.sleep(0.05)

        def burst() -> None:  # from kopf's threads, as the handlers do
            for i in range(50):
                assert queue.mark(("ns", "a"), {"v": i} if i % 10 == 0 else None)
            assert queue.mark(("ns", "b"))
            assert queue.mark(("ns", "bad"))
            assert queue.mark(("ns", "slow"))

        await asyncio.to_thread(burst)
        await asyncio.sleep(0.2)  # the slow one is being handled
        queue.mark(("ns", "slow"), "again")
        await asyncio.sleep(0.8)
        stopped.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    assert handled.count((("ns", "a"), {"v": 40})) == 1  # one refresh, the last value kept
    assert [k for k, _ in handled].count(("ns", "a")) == 1
    assert (("ns", "b"), None) in handled
    assert [v for k, v in handled if k == ("ns", "slow")] == [None, "again"]
    assert not queue.mark(("ns", "a"))  # stopped: refused again
