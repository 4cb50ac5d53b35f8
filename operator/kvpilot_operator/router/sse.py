"""What the router reads of the responses it forwards: when generated text passes (for TTFT and
TPOT) and, for shadow comparison, the text itself. Bytes are forwarded before they are read here,
so none of this delays the client."""

from __future__ import annotations

import json
from typing import Any

MAX_CAPTURE = 1 << 20  # bytes of a response kept for comparison; beyond, it is not compared


def choice_texts(payload: Any) -> dict[int, str]:
    """Generated text per choice index in one completion, chat completion, or chunk of either."""
    out: dict[int, str] = {}
    choices = payload.get("choices") if isinstance(payload, dict) else None
    for c in choices if isinstance(choices, list) else []:
        if not isinstance(c, dict):
            continue
        text = c.get("text")
        if text is None:
            part = c.get("delta") or c.get("message") or {}
            text = part.get("content") if isinstance(part, dict) else None
        if isinstance(text, str) and text:
            index = c.get("index", 0)
            out[index if isinstance(index, int) else 0] = text
    return out


class ResponseReader:
    """Fed each forwarded chunk; notes text-carrying SSE events and optionally keeps the text."""

    def __init__(self, sse: bool, keep_text: bool):
        self.sse = sse
        self.keep_text = keep_text
        self.first_text: float | None = None  # clock time the first text event passed
        self.last_text: float | None = None
        self.text_events = 0
        self.overflow = False  # more than MAX_CAPTURE to keep: not comparable
        self._buf = bytearray()
        self._kept = 0
        self._texts: dict[int, list[str]] = {}

    def feed(self, chunk: bytes, now: float) -> None:
        if not self.sse:
            if self.keep_text and not self.overflow:
                self._buf += chunk
                self.overflow = len(self._buf) > MAX_CAPTURE
            return
        self._buf += chunk
        while True:
            end, sep = self._buf.find(b"\n\n"), 2
            crlf = self._buf.find(b"\r\n\r\n")
            if crlf >= 0 and (end < 0 or crlf < end):
                end, sep = crlf, 4
            if end < 0:
                break
            event = bytes(self._buf[:end])
            del self._buf[: end + sep]
            self._event(event, now)

    def _event(self, event: bytes, now: float) -> None:
        for line in event.splitlines():
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                continue
            try:
                texts = choice_texts(json.loads(data))
            except ValueError:
                continue
            if not texts:
                continue  # the role-only opener, a finish or usage chunk: no generated text
            if self.first_text is None:
                self.first_text = now
            self.last_text = now
            self.text_events += 1
            if self.keep_text and not self.overflow:
                for i, t in texts.items():
                    self._texts.setdefault(i, []).append(t)
                self._kept += sum(len(t) for t in texts.values())
                self.overflow = self._kept > MAX_CAPTURE

    def texts(self) -> dict[int, str] | None:
        """The generated text by choice index (empty choices left out); None if unknown."""
        if not self.keep_text or self.overflow:
            return None
        if self.sse:
            return {i: "".join(parts) for i, parts in self._texts.items()}
        try:
            return choice_texts(json.loads(bytes(self._buf)))
        except ValueError:
            return None
