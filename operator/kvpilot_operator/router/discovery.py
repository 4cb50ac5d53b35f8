"""Where routes, endpoints and endpoint load come from.

Two sources make the same snapshot (a RouteConfig and the endpoints):
- static, `--config FILE`: the JSON file, re-read whenever it changes, so weights can be moved
  live by rewriting it (tests, drills, routers outside Kubernetes);
- Kubernetes, `--namespace NS --service NAME`: the ConfigMap `<NAME>-router` (key routes.json)
  the operator writes, and the service's ready engine and shadow pods, both watched.
Load comes from the engines' own /metrics (KV usage, queue), scraped every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
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
    """Routes and endpoints from the API server, kept current by two watches, as an informer
    does (list, then watch from that version; a watch that ends or expires is resumed, a 410
    Gone lists again): the ConfigMap `<service>-router` and the service's engine and shadow
    pods. `poll()` reads the cached state and makes no request, so a router at rest costs the
    API server one request per watch timeout, not several a second."""

    def __init__(
        self,
        namespace: str,
        service: str,
        kubeconfig: str | None = None,
        watch_timeout_s: int = 300,
        sync_timeout_s: float = 10.0,
    ):
        from kubernetes import client

        from kvpilot_operator.controller.kube import api_client

        self.namespace, self.service = namespace, service
        self.core = client.CoreV1Api(api_client(kubeconfig))
        self.watch_timeout_s, self.sync_timeout_s = watch_timeout_s, sync_timeout_s
        self._lock = threading.Lock()
        self._routes: str | None = None  # the ConfigMap's routes.json; None: no ConfigMap
        self._pods: dict[str, Any] = {}
        self._version = 0  # bumped by every change either watch sees
        self._seen = -1
        self._synced = {"configmap": threading.Event(), "pods": threading.Event()}
        self._error = ""
        self._threads: list[threading.Thread] = []
        self._watches: dict[str, Any] = {}
        self._stopping = threading.Event()
        self.requests = 0  # lists and watches started, for tests and benchmarks

    def _lists(self) -> dict[str, tuple[Callable[..., Any], dict[str, Any]]]:
        pods = f"{SERVICE_LABEL}={self.service},{COMPONENT_LABEL} in (engine,shadow)"
        # By name, which a Role limited to that one ConfigMap (resourceNames) may list and watch.
        configmap = f"metadata.name={self.service}-router"
        return {
            "configmap": (self.core.list_namespaced_config_map, {"field_selector": configmap}),
            "pods": (self.core.list_namespaced_pod, {"label_selector": pods}),
        }

    def _replace(self, kind: str, items: list[Any]) -> None:
        with self._lock:
            if kind == "configmap":
                self._routes = (items[0].data or {}).get(ROUTES_KEY, "") if items else None
            else:
                self._pods = {p.metadata.name: p for p in items}
            self._version += 1

    def _event(self, kind: str, type_: str, obj: Any) -> None:
        with self._lock:
            if kind == "configmap":
                gone = type_ == "DELETED"
                self._routes = None if gone else (obj.data or {}).get(ROUTES_KEY, "")
            elif type_ == "DELETED":
                self._pods.pop(obj.metadata.name, None)
            else:
                self._pods[obj.metadata.name] = obj
            self._version += 1

    def _follow(self, kind: str) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        list_fn, selector = self._lists()[kind]
        version = None
        while not self._stopping.is_set():
            try:
                if version is None:
                    self.requests += 1
                    listing = list_fn(self.namespace, **selector)
                    self._replace(kind, listing.items)
                    version = listing.metadata.resource_version
                    self._synced[kind].set()
                self.requests += 1
                self._watches[kind] = w = watch.Watch()
                stream = w.stream(
                    list_fn, self.namespace, resource_version=version,
                    timeout_seconds=self.watch_timeout_s, **selector,
                )  # fmt: skip
                for event in stream:
                    obj = event["object"]
                    version = obj.metadata.resource_version
                    self._event(kind, event["type"], obj)
                self._error = ""
            except ApiException as e:
                if e.status == 410:  # too old to resume: list again
                    version = None
                    continue
                self._fail(kind, e)
                version = None
            except Exception as e:  # the API server restarting, a dropped connection
                self._fail(kind, e)
                version = None

    def stop(self) -> None:
        """End the watches (each returns at its next event or timeout; the threads are daemons,
        so an exiting router does not wait for them)."""
        self._stopping.set()
        for w in list(self._watches.values()):
            w.stop()

    def _fail(self, kind: str, error: Exception) -> None:
        if self._stopping.is_set():
            return
        message = f"{kind}: {error}"
        if message != self._error:
            log.error("watch failed; keeping the last good routes", error=message)
        self._error = message
        time.sleep(1.0)

    def _start(self) -> None:
        for kind in self._synced:
            t = threading.Thread(target=self._follow, args=(kind,), daemon=True, name=kind)
            t.start()
            self._threads.append(t)

    def poll(self) -> Snapshot | None:
        """The routes and endpoints if either changed since the last poll, else None. The first
        call starts the watches and waits for their first listing (blocking: call it in a
        thread)."""
        if not self._threads:
            self._start()
        deadline = time.monotonic() + self.sync_timeout_s
        for kind, synced in self._synced.items():
            if not synced.wait(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"no first listing of the {kind} yet: {self._error}")
        with self._lock:
            if self._version == self._seen:
                return None
            self._seen = self._version
            routes, pods = self._routes, list(self._pods.values())
        by_component: dict[str, list[Endpoint]] = {"engine": [], "shadow": []}
        for pod in pods:
            ep = _pod_endpoint(pod)
            component = (pod.metadata.labels or {}).get(COMPONENT_LABEL)
            if ep is not None and component in by_component:
                by_component[component].append(ep)
        engines = by_component["engine"]
        if routes is None:  # no ConfigMap: spread over whatever is there
            config = RouteConfig.implicit(self.service, (e.revision for e in engines))
        elif not routes:
            raise ValueError(f"ConfigMap {self.service}-router has no {ROUTES_KEY}")
        else:
            config = RouteConfig.from_json(routes)
        # Shadow pods carry their own component, so user traffic selectors never match them.
        endpoints = sorted(engines + by_component["shadow"], key=lambda e: e.url)
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


def parse_models(doc: Any) -> dict[str, tuple[str | None, str | None]]:
    """An engine's /v1/models -> {id: (root, parent)}; parent None for a base model."""
    out: dict[str, tuple[str | None, str | None]] = {}
    for card in doc.get("data") or []:
        if isinstance(card, dict) and isinstance(card.get("id"), str):
            root, parent = card.get("root"), card.get("parent")
            out[card["id"]] = (
                root if isinstance(root, str) else None,
                parent if isinstance(parent, str) else None,
            )
    return out


async def read_models(
    table: RouteTable,
    client: httpx.AsyncClient,
    url: str,
    timeout: float,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """Best effort: the engine's /v1/models into the table (`headers`: the engines' API key)."""
    with contextlib.suppress(Exception):
        resp = await client.get(f"{url}/v1/models", timeout=timeout, headers=list(headers))
        if resp.status_code == 200:
            table.set_models(url, parse_models(resp.json()))


async def scrape_loop(
    table: RouteTable,
    client: httpx.AsyncClient,
    interval: float,
    timeout: float = 1.0,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """Best effort: an endpoint that does not answer keeps its last figures. Its /v1/models too
    (`headers`: the engines' API key), for the adapters it holds."""

    async def one(url: str) -> None:
        with contextlib.suppress(Exception):
            resp = await client.get(f"{url}/metrics", timeout=timeout)
            if resp.status_code == 200:
                table.set_load(url, *parse_load(resp.text))
        await read_models(table, client, url, timeout, headers)

    while True:
        urls: Sequence[str] = list(table.endpoints)
        await asyncio.gather(*(one(u) for u in urls))
        await asyncio.sleep(interval)
