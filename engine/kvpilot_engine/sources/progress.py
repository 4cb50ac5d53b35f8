"""The download's log: JSON lines on stderr, one every few seconds while bytes arrive.

The last line of a failed download is its error, which the init container's termination message
(`FallbackToLogsOnError`) carries to the operator and on to the LLMService's status."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvpilot_engine.sources.base import Fetched


def log_event(event: str, **fields: Any) -> None:
    record = {"event": event, **fields}
    print(json.dumps(record, sort_keys=False), file=sys.stderr, flush=True)


def tree_bytes(root: Path) -> int:
    """Bytes under `root`, partial files included (a polled measure: the Hub client and boto3
    write in their own threads)."""
    total = 0
    for p in root.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except OSError:  # renamed or removed between listing and stat
            continue
    return total


class Progress:
    """Logs `download progress` every `interval` seconds from `start` until `stop`."""

    def __init__(self, uri: str, dest: Path, interval: float = 5.0) -> None:
        self.uri, self.dest, self.interval = uri, dest, interval
        self.total = 0
        self.baseline = 0  # bytes already there when this run started (resumed)
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, total: int, files: int, revision: str) -> None:
        self.total = total
        self.baseline = min(tree_bytes(self.dest), total)
        self.t0 = time.monotonic()
        log_event(
            "download started",
            uri=self.uri,
            revision=revision,
            files=files,
            bytes=total,
            present=self.baseline,
        )
        if self.interval > 0:
            self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
            self._thread.start()

    def _line(self) -> dict[str, Any]:
        have = min(tree_bytes(self.dest), self.total)
        elapsed = max(time.monotonic() - self.t0, 1e-6)
        return {
            "bytes": have,
            "total": self.total,
            "percent": round(100.0 * have / self.total, 1) if self.total else 100.0,
            "mibPerSecond": round((have - self.baseline) / elapsed / 2**20, 2),
        }

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            log_event("download progress", uri=self.uri, **self._line())

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def done(self, fetched: Fetched) -> None:
        self.stop()
        log_event(
            "download complete",
            **fetched.summary(),
            seconds=round(time.monotonic() - self.t0, 2),
        )
