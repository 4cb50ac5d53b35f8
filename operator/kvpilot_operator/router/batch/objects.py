"""The File and Batch objects, as OpenAI's API returns them (and `openai` parses them)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, Field

BatchStatus = Literal[
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
]
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
# OpenAI offers "24h" only; a shorter window is what a deadline is made of (seconds too: a
# window that closes while you watch, to see what expiry does to a pipeline).
_WINDOW_RE = re.compile(r"^([1-9][0-9]{0,4})(h|m|s)$")
_UNIT_SECONDS = {"h": 3600, "m": 60, "s": 1}


def window_seconds(window: str) -> int:
    """`24h`, `90m`, `600s`: the completion window in seconds; ValueError for anything else."""
    m = _WINDOW_RE.match(window)
    if m is None:
        raise ValueError(f"completion_window must look like 24h, 90m or 600s, got {window!r}")
    return int(m.group(1)) * _UNIT_SECONDS[m.group(2)]


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchErrorData(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchErrorData] = Field(default_factory=list)


class Batch(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    metadata: dict[str, str] | None = None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


def page(items: list[Any], first_id: str | None, last_id: str | None, more: bool) -> dict:  # type: ignore[type-arg]
    return {
        "object": "list",
        "data": items,
        "first_id": first_id,
        "last_id": last_id,
        "has_more": more,
    }
