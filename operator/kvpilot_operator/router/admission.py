"""Bounded admission: at most `max_in_flight` requests proxied at once, up to `max_queue` more
waiting in FIFO order, the rest refused at once (a fast 503 beats a slow timeout).

Requests also wait while there is nowhere to send them: a service scaled to zero still accepts
requests, and the queue they form is the signal (`kvpilot_router_waiting_requests`) that wakes it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable


class Rejected(Exception):
    def __init__(self, reason: str):  # queue_full | queue_timeout
        super().__init__(reason)
        self.reason = reason


class Admission:
    def __init__(self, max_in_flight: int, max_queue: int, can_route: Callable[[], bool]):
        if max_in_flight < 1 or max_queue < 0:
            raise ValueError("max_in_flight must be at least 1 and max_queue at least 0")
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.can_route = can_route
        self.in_flight = 0
        self._queue: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def _has_room(self) -> bool:
        return self.in_flight < self.max_in_flight and self.can_route()

    async def admit(self, timeout: float) -> None:
        """Take a slot, waiting up to `timeout` seconds in the queue; raises Rejected."""
        if not self._queue and self._has_room():
            self.in_flight += 1
            return
        if len(self._queue) >= self.max_queue:
            raise Rejected("queue_full")
        slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(slot)
        try:
            # asyncio.wait, not wait_for: it never cancels `slot`, so a slot granted just as the
            # timeout fires is seen as granted here and is not lost.
            await asyncio.wait((slot,), timeout=timeout)
        except asyncio.CancelledError:  # our client has gone
            if slot.done():
                self.release()
            else:
                slot.cancel()
                self._queue.remove(slot)
            raise
        if not slot.done():
            slot.cancel()
            self._queue.remove(slot)
            raise Rejected("queue_timeout")

    def release(self) -> None:
        self.in_flight -= 1
        self.wake()

    def wake(self) -> None:
        """Hand free slots to the longest waiters (also when endpoints appear)."""
        while self._queue and self._has_room():
            slot = self._queue.popleft()
            self.in_flight += 1
            slot.set_result(None)
