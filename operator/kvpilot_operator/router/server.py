"""`kvpilot router`: load the routes, then serve the proxy with uvicorn."""

from __future__ import annotations

import argparse
import os

import structlog
import uvicorn
from kvpilot_engine.server.http import h11_with_header_timeout
from kvpilot_engine.server.logs import configure_logging

from kvpilot_operator.router.batch.api import batch_settings
from kvpilot_operator.router.discovery import KubernetesSource, Snapshot, Source, StaticSource
from kvpilot_operator.router.proxy import ProxySettings, Router
from kvpilot_operator.router.table import RouteTable

log = structlog.get_logger("kvpilot.router")

API_KEY_ENV = "KVPILOT_API_KEY"
UPSTREAM_API_KEY_ENV = "KVPILOT_UPSTREAM_API_KEY"
# Tiers: `PRIORITY=KEY,PRIORITY=KEY` (e.g. `-10=k-gold,10=k-batch`); each key is also accepted.
PRIORITY_KEYS_ENV = "KVPILOT_PRIORITY_KEYS"


def priority_keys(text: str) -> tuple[tuple[str, int], ...]:
    """KVPILOT_PRIORITY_KEYS as (key, priority) pairs; split on the first `=`, as keys (base64)
    may end in `=`. Raises ValueError, naming the variable, for anything else."""
    out = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        priority, sep, key = item.partition("=")
        try:
            out.append((key, int(priority)))
        except ValueError:
            sep = ""
        if not sep or not key:
            raise ValueError(f"{PRIORITY_KEYS_ENV}: expected PRIORITY=KEY, got {item[:8]!r}...")
    return tuple(out)


def api_keys(ns: argparse.Namespace) -> tuple[str, ...]:
    keys = list(ns.api_key or [])
    keys += [k.strip() for k in os.environ.get(API_KEY_ENV, "").split(",")]
    return tuple(k for k in keys if k)


def settings_from(ns: argparse.Namespace) -> ProxySettings:
    return ProxySettings(
        retries=ns.retries,
        connect_timeout=ns.connect_timeout,
        request_timeout=ns.request_timeout,
        max_in_flight=ns.max_in_flight,
        max_queue=ns.max_queue,
        queue_timeout=ns.queue_timeout,
        max_request_bytes=ns.max_request_bytes,
        failover_wait=ns.failover_wait,
        api_keys=api_keys(ns),
        priority_keys=priority_keys(os.environ.get(PRIORITY_KEYS_ENV, "")),
        default_priority=ns.default_priority,
        # Read whole, not split on commas: it must equal the engines' `--api-key` as it is.
        upstream_api_key=ns.upstream_api_key or os.environ.get(UPSTREAM_API_KEY_ENV) or None,
        refresh_interval=ns.refresh_interval,
        scrape_interval=ns.scrape_interval,
        shadow_timeout=ns.shadow_timeout,
        shadow_concurrency=ns.shadow_max_concurrency,
        batch=batch_settings(ns),
    )


def source_from(ns: argparse.Namespace) -> Source:
    if ns.config and (ns.namespace or ns.service):
        raise ValueError("--config and --namespace/--service exclude each other")
    if ns.config:
        return StaticSource(ns.config)
    if not (ns.namespace and ns.service):
        raise ValueError("give --config FILE, or --namespace and --service")
    return KubernetesSource(ns.namespace, ns.service, ns.kubeconfig)


def run_router(ns: argparse.Namespace) -> int:
    configure_logging(ns.log_level, quiet=("httpx", "httpcore"))
    source = source_from(ns)
    table = RouteTable(
        prefix_chars=ns.prefix_chars, load_factor=ns.load_factor, eject_seconds=ns.eject_seconds
    )
    router = Router(table, settings_from(ns), source)
    if isinstance(source, StaticSource):
        # A file that does not parse at start is an operator's typo: say so and stop. Later
        # bad writes keep the last good routes (discovery.follow).
        snap: Snapshot | None = source.poll()
        assert snap is not None
        router.apply(snap)
    config = uvicorn.Config(
        router.app(),
        host=ns.host,
        port=ns.port,
        log_config=None,  # ours (JSON) stays in place
        access_log=False,  # the proxy logs each request with its id, revision and endpoint
        # SIGTERM: stop accepting, let streams in flight finish (the pod's grace period is 60 s).
        timeout_graceful_shutdown=50,
        timeout_keep_alive=30,
        # h11 whatever else is installed (its header bound is --max-header-bytes), with a deadline
        # for each request's headers (--header-timeout).
        http=h11_with_header_timeout(ns.header_timeout),
        limit_concurrency=ns.max_connections,
        h11_max_incomplete_event_size=ns.max_header_bytes,
    )
    log.info(
        "starting",
        port=ns.port,
        source="file" if isinstance(source, StaticSource) else "kubernetes",
        auth=bool(router.settings.api_keys),
    )
    uvicorn.Server(config).run()
    return 0
