"""A work queue that coalesces: keys marked from any thread, each handled once per burst.

An engine Deployment's status changes several times while it rolls out, and so do its canary's,
its shadow's and its router's; each change asks for the same thing, a refresh of the owner's
status. Handled one event at a time on kopf's worker threads, 200 new services make about 1,000
refreshes that queue in front of the next service's creation. Here a mark only records the key
(and the latest value that came with it); after `delay` the keys marked meanwhile are handled
once each, at most `concurrency` at a time on a pool of its own, and a key marked again while it
is handled is handled again after. controller-runtime's work queue does the same for Go
operators.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger("kvpilot.coalesce")

Key = tuple[str, str]  # (namespace, name)


class Coalescer:
    def __init__(
        self,
        name: str,
        handle: Callable[[Key, Any], None],
        delay: float = 0.5,
        concurrency: int = 4,
    ):
        self.name = name
        self.handle = handle
        self.delay = delay
        self.concurrency = concurrency
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[Key, Any] = {}
        self._wake: asyncio.Event | None = None

    def mark(self, key: Key, value: Any = None) -> bool:
        """From any thread. False when the queue is not running: the caller handles it itself.
        A None value keeps the one an earlier mark of the same burst brought."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return False
        try:
            loop.call_soon_threadsafe(self._mark, key, value)
        except RuntimeError:  # the loop has just stopped
            return False
        return True

    def _mark(self, key: Key, value: Any) -> None:
        if value is not None or key not in self._pending:
            self._pending[key] = value
        assert self._wake is not None
        self._wake.set()

    def _handle(self, key: Key, value: Any) -> None:
        try:
            self.handle(key, value)
        except Exception:  # one owner's failure must not stop the queue
            log.exception("%s: handling %s/%s failed", self.name, *key)

    async def run(self, stopped: asyncio.Event) -> None:
        """Until `stopped` is set; a burst being handled is finished first."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix=f"kvpilot-{self.name}")
        stop = asyncio.ensure_future(stopped.wait())
        try:
            while not stopped.is_set():
                wake = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait({wake, stop}, return_when=asyncio.FIRST_COMPLETED)
                wake.cancel()
                if stopped.is_set():
                    break
                await asyncio.sleep(self.delay)  # let the burst gather
                batch, self._pending = self._pending, {}
                self._wake.clear()
                await asyncio.gather(
                    *(
                        self._loop.run_in_executor(pool, self._handle, key, value)
                        for key, value in batch.items()
                    )
                )
        finally:
            self._loop = None
            stop.cancel()
            pool.shutdown(wait=False, cancel_futures=True)
