"""Run `kvpilot router` as a process in front of engines, with a static route file a test may
rewrite to move traffic live; and upstreams that fail on purpose."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support.engine import Server, free_port, scrape, stop, wait_ready
from tests.support.kube import wait_for

SLOW_STEP_S = 0.3
# ---- routers ------------------------------------------------------------------------------------
def routes(
    revisions: dict[str, tuple[int, list[str]]],
    shadow: tuple[str, list[str]] | None = None,
    mirror_percent: float = 100.0,
    max_rps: float | None = None,
) -> dict[str, Any]:
    """{'stable': (75, [url, ...])} (and a shadow revision with its URLs) as routes.json."""
    doc: dict[str, Any] = {
        "service": "test",
        "revisions": [{"name": n, "weight": w} for n, (w, _) in revisions.items()],
        "endpoints": [
            {"url": u, "revision": n} for n, (_, urls) in revisions.items() for u in urls
        ],
        "shadow": None,
    }
    if shadow is not None:
        name, urls = shadow
        doc["shadow"] = {"revision": name, "mirrorPercent": mirror_percent, "maxRps": max_rps}
        doc["endpoints"] += [{"url": u, "revision": name} for u in urls]
    return doc
# ---- small helpers ------------------------------------------------------------------------------
def value(samples_: dict[str, float], name: str, **labels: str) -> float:
    """One sample (0 if absent: a counter never incremented has no labelled child)."""
    key = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    return samples_.get(key, 0.0)


@dataclass
class Router(Server):
    """A `kvpilot router` subprocess (url and log as the engine's `Server`) and its route file."""

    config_path: Path = Path()

    def state(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/router/state", timeout=10).json()

    def metrics(self) -> dict[str, float]:
        return scrape(self.url)

    def set_routes(self, doc: dict[str, Any]) -> None:
        """Rewrite the route file (atomically, as an operator should) and wait for the reload."""
        write_json(self.config_path, doc)
        want = {r["name"]: r["weight"] for r in doc["revisions"]}
        urls = sorted(e["url"] for e in doc["endpoints"])

        def applied() -> bool:
            st = self.state()
            have = {r["name"]: r["weight"] for r in st["config"]["revisions"]}
            return have == want and sorted(e["url"] for e in st["endpoints"]) == urls

        wait_for("the router to reload its routes", applied)


def write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


@contextlib.contextmanager
def run_router(
    tmp_path: Path, doc: dict[str, Any], *flags: str, env: dict[str, str] | None = None
) -> Iterator[Router]:
    port = free_port()
    config_path = tmp_path / f"routes-{port}.json"
    log_path = tmp_path / f"router-{port}.log"
    write_json(config_path, doc)
    cmd = [
        sys.executable, "-m", "kvpilot_engine.cli", "router", "--config", str(config_path),
        "--host", "127.0.0.1", "--port", str(port), "--scrape-interval", "0.5", *flags,
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    router = Router(proc, port, log_path, config_path)
    try:
        wait_ready(router, "kvpilot router", timeout=60)
        yield router
    finally:
        stop(proc, grace=20)


def total(samples_: dict[str, float], name: str) -> float:
    """The sum over every labelled sample of `name`."""
    return sum(v for k, v in samples_.items() if k.split("{", 1)[0] == name)


@contextlib.contextmanager
def erroring_server(status: int = 500, code: str | None = None) -> Iterator[str]:
    """A loopback HTTP server (tests/router/failing_upstream.py) answering every POST with
    `status` and an OpenAI-shaped error (with `code`)."""
    port = free_port()
    args = [sys.executable, "-m", "tests.router.failing_upstream", str(port), str(status)]
    proc = subprocess.Popen(args + ([code] if code else []))
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.post(url, content=b"{}", timeout=1).status_code == status
            return False

        wait_for("the failing upstream to listen", up)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
