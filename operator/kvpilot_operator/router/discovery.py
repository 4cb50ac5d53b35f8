"""Where routes, endpoints and endpoint load come from.

Two sources make the same snapshot (a RouteConfig and the endpoints):
- static, `--config FILE`: the JSON file, re-read whenever it changes, so weights can be moved
  live by rewriting it (tests, drills, routers outside Kubernetes);
- Kubernetes, `--namespace NS --service NAME`: the ConfigMap `<NAME>-router` (key routes.json)
  the operator writes, and the service's ready engine and shadow pods.
Load comes from the engines' own /metrics (KV usage, queue), scraped every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import structlog
from prometheus_client.parser import text_string_to_metric_families

from kvpilot_operator.api.names import (
    COMPONENT_LABEL,
    ENGINE_PORT,
    REVISION_LABEL,
    ROUTES_KEY,
    SERVICE_LABEL,
)
from kvpilot_operator.router.config import Endpoint, RouteConfig
from kvpilot_operator.router.table import RouteTable

log = structlog.get_logger("kvpilot.router.discovery")


@dataclass(frozen=True)
class Snapshot:
    config: RouteConfig
    endpoints: tuple[Endpoint, ...]


class StaticSource:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None

    def poll(self) -> Snapshot | None:
        """The file's routes if it changed since the last poll, else None."""
        st = self.path.stat()
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return None
        # Noted before parsing: a bad file is reported once, not every second until it is fixed.
        self._stamp = stamp
        config = RouteConfig.from_json(self.path.read_bytes())
        return Snapshot(config, config.endpoints)


def _pod_endpoint(pod: Any) -> Endpoint | None:
    """A ready, running, not-terminating pod as an endpoint; None otherwise."""
    meta, status = pod.metadata, pod.status
    if meta.deletion_timestamp is not None or status is None or not status.pod_ip:
        return None
    if not any(c.type == "Ready" and c.status == "True" for c in status.conditions or []):
        return None
    port = ENGINE_PORT
    for container in pod.spec.containers:
        for p in container.ports or []:
            if p.name == "http":
                port = p.container_port
    revision = (meta.labels or {}).get(REVISION_LABEL, "")
    return Endpoint(f"http://{status.pod_ip}:{port}", revision)


class KubernetesSource:
    def __init__(self, namespace: str, service: str, kubeconfig: str | None = None):
        from kubernetes import client

        from kvpilot_operator.controller.kube import api_client

        self.namespace, self.service = namespace, service
        self.core = client.CoreV1Api(api_client(kubeconfig))

    def _config(self) -> RouteConfig | None:
        from kubernetes.client.exceptions import ApiException

        try:
            cm = self.core.read_namespaced_config_map(f"{self.service}-router", self.namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        text = (cm.data or {}).get(ROUTES_KEY)
        if text is None:
            raise ValueError(f"ConfigMap {self.service}-router has no {ROUTES_KEY}")
        return RouteConfig.from_json(text)

    def _endpoints(self, component: str) -> list[Endpoint]:
        selector = f"{SERVICE_LABEL}={self.service},{COMPONENT_LABEL}={component}"
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        return [ep for ep in map(_pod_endpoint, pods) if ep is not None]

    def poll(self) -> Snapshot:
        """Blocking (the client is synchronous): call it in a thread."""
        config = self._config()
        engines = self._endpoints("engine")
        if config is None:  # no ConfigMap: spread over whatever is there
            config = RouteConfig.implicit(self.service, (e.revision for e in engines))
        # Shadow pods carry their own component, so user traffic selectors never match them.
        endpoints = sorted(engines + self._endpoints("shadow"), key=lambda e: e.url)
        return Snapshot(config, tuple(endpoints))


Source = StaticSource | KubernetesSource


async def follow(source: Source, interval: float, on_snapshot: Callable[[Snapshot], None]) -> None:
    """Poll forever; a failed poll keeps the last good routes and is logged when it changes."""
    last_error = ""
    while True:
        try:
            snap = await asyncio.to_thread(source.poll)
            if last_error:
                log.info("routes readable again")
            last_error = ""
            if snap is not None:
                on_snapshot(snap)
        except Exception as e:
            if str(e) != last_error:
                log.error("cannot read routes; keeping the last good ones", error=str(e))
            last_error = str(e)
        await asyncio.sleep(interval)


_LOAD_METRICS = ("vllm:kv_cache_usage_perc", "vllm:num_requests_waiting")


def parse_load(text: str) -> tuple[float | None, float | None]:
    """(vllm:kv_cache_usage_perc, vllm:num_requests_waiting) from an engine's /metrics."""
    # Only the two families' lines reach the parser: the whole page (histograms) would hold the
    # event loop for milliseconds, and every request in flight would wait that long.
    lines = [ln for ln in text.splitlines() if any(m in ln for m in _LOAD_METRICS)]
    found: dict[str, float] = {}
    for family in text_string_to_metric_families("\n".join(lines) + "\n"):
        for s in family.samples:
            if s.name in _LOAD_METRICS:
                found[s.name] = found.get(s.name, 0.0) + s.value
    return found.get(_LOAD_METRICS[0]), found.get(_LOAD_METRICS[1])


async def scrape_loop(
    table: RouteTable, client: httpx.AsyncClient, interval: float, timeout: float = 1.0
) -> None:
    """Best effort: an endpoint that does not answer keeps its last figures."""

    async def one(url: str) -> None:
        with contextlib.suppress(Exception):
            resp = await client.get(f"{url}/metrics", timeout=timeout)
            if resp.status_code == 200:
                table.set_load(url, *parse_load(resp.text))

    while True:
        urls: Sequence[str] = list(table.endpoints)
        await asyncio.gather(*(one(u) for u in urls))
        await asyncio.sleep(interval)
