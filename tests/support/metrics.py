"""A real /metrics endpoint on loopback for a Prometheus to scrape: prometheus-client's own HTTP
server over a registry the test fills."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from kvpilot_operator.local.procs import free_ports
from prometheus_client import CollectorRegistry, start_http_server


@contextlib.contextmanager
def serving(registry: CollectorRegistry) -> Iterator[str]:
    """`host:port` of the registry's /metrics, for as long as the block runs."""
    port = free_ports(1)[0]
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
