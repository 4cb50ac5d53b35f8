"""`python -m tests.router.failing_upstream PORT [STATUS [CODE]]`: an HTTP server that answers every
POST with an OpenAI-shaped error (500 unless told; 503 comes with Retry-After, as an engine's
does; CODE is the error's code, e.g. "unavailable" as a draining engine says it). A
process of its own, so that serving the router's requests takes no time from the test process
that measures latency."""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

STATUS = 500
CODE: str | None = None


def body() -> bytes:
    error = {"message": "boom", "type": "server_error", "param": None, "code": CODE}
    return json.dumps({"error": error}).encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like an engine

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(STATUS)
        self.send_header("content-type", "application/json")
        if STATUS == 503:
            self.send_header("retry-after", "1")
        payload = body()
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


if __name__ == "__main__":
    STATUS = int(sys.argv[2]) if len(sys.argv) > 2 else 500
    CODE = sys.argv[3] if len(sys.argv) > 3 else None
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
