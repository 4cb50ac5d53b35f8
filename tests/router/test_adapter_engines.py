"""LoRA adapters through real `kvpilot router` and `kvpilot serve --enable-lora` processes.

Two engines hold different adapters (`sql` on one, `help` on the other): each adapter's
requests go to its engine, unknown names are the router's own 404, /v1/models lists both; a
holder over its bound spills to the other engine, which loads the adapter at runtime. Then the
adapter canaries end to end short of a cluster: the operator's reconcile (on the in-memory Kube)
writes the routes, a real Prometheus scrapes the router's per-adapter series, and the rollout
controller promotes a good canary (another version of `sql`) and rolls back a broken one (a
`help` version whose weights are not a safetensors file: the engines refuse to load it, each of
its requests fails, and the error rate fails the canary's analysis).
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest
from kvpilot_operator.api.names import ROUTES_KEY, router_name
from kvpilot_operator.api.types import API_VERSION
from kvpilot_operator.controller.manifests import RenderOptions
from kvpilot_operator.controller.reconcile import reconcile
from kvpilot_operator.local.prometheus import LocalPrometheus
from kvpilot_operator.observability.prometheus import PrometheusSource
from kvpilot_operator.rollout.controller import RolloutController

from tests.support.engine import MODEL, Server, run_server, scrape
from tests.support.lora import write_adapter, write_corrupt_adapter
from tests.support.memkube import MemoryKube
from tests.support.router import Router, routes, run_router, value, write_json

pytestmark = pytest.mark.slow

LORA_FLAGS = ("--enable-lora", "--max-loras", "2", "--allow-runtime-lora-updating")


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    paths = {
        "sql": write_adapter(root / "sql-v1", seed=1),
        "sql-v2": write_adapter(root / "sql-v2", seed=2),
        "help": write_adapter(root / "help", rank=4, targets=("o_proj", "down_proj"), seed=3),
        "help-broken": write_corrupt_adapter(root / "help-broken"),
    }
    # A shadow of help with the same weights: its greedy answers must agree.
    paths["help-shadow"] = Path(shutil.copytree(paths["help"], root / "help-shadow"))
    return paths


@pytest.fixture(scope="module")
def engines(
    tmp_path_factory: pytest.TempPathFactory, loras: dict[str, Path]
) -> Iterator[tuple[Server, Server]]:
    """(the engine holding sql, the engine holding help), started side by side."""
    logs = tmp_path_factory.mktemp("lora_engines")
    managers: list[AbstractContextManager[Server]] = [
        run_server(logs / "sql.log", *LORA_FLAGS, "--lora-modules", f"sql={loras['sql']}"),
        run_server(logs / "help.log", *LORA_FLAGS, "--lora-modules", f"help={loras['help']}"),
    ]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(m.__enter__) for m in managers]
        started = [f.result() for f in futures]
    try:
        yield started[0], started[1]
    finally:
        for m in managers:
            m.__exit__(None, None, None)


def served(engine: Server, adapter: str) -> float:
    """Requests `engine` finished on `adapter`."""
    m = scrape(engine.url)
    return sum(
        v
        for k, v in m.items()
        if k.startswith("kvpilot_engine_lora_request_success_total{")
        and f'lora_name="{adapter}"' in k
    )


def complete(router: Router, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "prompt": "SELECT", "max_tokens": 2, **extra}
    return httpx.post(f"{router.url}/v1/completions", json=body, timeout=60)


def test_adapters_go_to_the_engines_that_hold_them(
    engines: tuple[Server, Server], tmp_path: Path
) -> None:
    sql_engine, help_engine = engines
    doc = routes({"r1": (100, [sql_engine.url, help_engine.url])})
    with run_router(tmp_path, doc) as router:
        before = {(e.port, a): served(e, a) for e in engines for a in ("sql", "help")}
        for _ in range(4):
            for model in ("sql", "help", MODEL):
                r = complete(router, model)
                assert r.status_code == 200, r.text
        assert served(sql_engine, "sql") - before[(sql_engine.port, "sql")] == 4
        assert served(help_engine, "help") - before[(help_engine.port, "help")] == 4
        assert served(help_engine, "sql") == before[(help_engine.port, "sql")] == 0

        # An unknown model is the router's own 404, in OpenAI's shape.
        r = complete(router, "no-such-adapter")
        assert r.status_code == 404 and "x-kvpilot-revision" not in r.headers
        assert r.json()["error"]["code"] == "model_not_found"
        assert r.json()["error"]["param"] == "model"

        cards = httpx.get(f"{router.url}/v1/models", timeout=10).json()["data"]
        assert {c["id"]: c["parent"] for c in cards} == {MODEL: None, "sql": MODEL, "help": MODEL}
        m = router.metrics()
        assert value(m, "kvpilot_router_adapter_requests_total",
                     adapter="sql", variant="stable", code="200") == 4  # fmt: skip
        assert value(m, "kvpilot_router_rejected_total", reason="unknown_model") == 1


def test_a_busy_holder_spills_to_an_engine_that_loads_the_adapter(
    engines: tuple[Server, Server], tmp_path: Path
) -> None:
    sql_engine, help_engine = engines
    doc = routes({"r1": (100, [sql_engine.url, help_engine.url])})
    long = {"model": "sql", "prompt": "SELECT", "max_tokens": 60, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with run_router(tmp_path, doc) as router:
        assert complete(router, "sql").status_code == 200  # the router has read the engines
        before = {e.port: served(e, "sql") for e in engines}
        started = threading.Barrier(4)
        results: list[int] = []

        def stream() -> None:
            with httpx.stream("POST", f"{router.url}/v1/completions", json=long, timeout=120) as r:
                chunks = r.iter_raw()
                next(chunks)  # in flight at the router
                started.wait(timeout=60)
                for _ in chunks:
                    pass
                results.append(r.status_code)

        threads = [threading.Thread(target=stream) for _ in range(3)]
        for t in threads:
            t.start()
        started.wait(timeout=60)
        # Three in flight on the sql engine, none on the other: over the bound (1.25 x fair).
        r = complete(router, "sql")
        assert r.status_code == 200, r.text
        for t in threads:
            t.join(timeout=120)
        assert results == [200, 200, 200]
        # The holder took requests up to its bound (1.25 x its fair share), the rest spilled
        # to the other engine, which loaded sql for them.
        after = {e.port: served(e, "sql") - before[e.port] for e in engines}
        assert after[sql_engine.port] >= 2 and after[help_engine.port] >= 1, after
        assert sum(after.values()) == 4
        cards = httpx.get(f"{help_engine.url}/v1/models", timeout=10).json()["data"]
        assert "sql" in {c["id"] for c in cards}
        assert "adapter loaded" in router.log_path.read_text()
    unload = {"lora_name": "sql"}
    assert httpx.post(f"{help_engine.url}/v1/unload_lora_adapter", json=unload).status_code == 200


NS, NAME = "team", "chat"
# Latency allowances wide enough for a loaded test machine: the broken canary fails on errors.
STEPS = {"steps": [50, 100], "stepSeconds": 15, "maxTtftRegression": 3.0,
         "maxTpotRegression": 3.0}  # fmt: skip


def test_adapter_canaries_promoted_and_rolled_back_on_the_routers_series(
    engines: tuple[Server, Server], loras: dict[str, Path], tmp_path: Path
) -> None:
    kube = MemoryKube()
    spec = {
        "model": {"source": {"path": MODEL}},
        "replicas": 1,
        "adapters": [
            {"name": "sql", "source": {"path": str(loras["sql"])},
             "canary": {**STEPS, "source": {"path": str(loras["sql-v2"])}}},
            {"name": "help", "source": {"path": str(loras["help"])},
             "canary": {**STEPS, "source": {"path": str(loras["help-broken"])}},
             "shadow": {"source": {"path": str(loras["help-shadow"])}, "mirrorPercent": 50}},
        ],
    }  # fmt: skip
    kube.create({"apiVersion": API_VERSION, "kind": "LLMService",
                 "metadata": {"name": NAME, "namespace": NS}, "spec": spec})  # fmt: skip

    def publish(body: dict[str, Any]) -> dict[str, Any]:
        """The reconcile, and its routes ConfigMap as static routes (the engines as endpoints)."""
        assert reconcile(kube, body, RenderOptions()).problem is None
        cm = kube.get("v1", "ConfigMap", router_name(NAME), NS)
        assert cm is not None
        doc = json.loads(cm["data"][ROUTES_KEY])
        revision = doc["revisions"][0]["name"]
        doc["endpoints"] = [{"url": e.url, "revision": revision} for e in engines]
        return doc

    doc = publish(kube.get_llmservice(NS, NAME) or {})
    assert {a["name"]: [v["weight"] for v in a["variants"]] for a in doc["adapters"]} == {
        "sql": [50, 50],
        "help": [50, 50],
    }
    events: list[tuple[str, str, str]] = []
    with run_router(tmp_path, doc) as router:
        prom = LocalPrometheus(scrape_interval=1.0)
        labels = {"namespace": NS, "kvpilot_io_llmservice": NAME,
                  "app_kubernetes_io_component": "router"}  # fmt: skip
        prom.set_targets([(f"127.0.0.1:{router.port}", labels)])
        stop = threading.Event()
        codes: dict[tuple[str, int], int] = {}

        def traffic(model: str) -> None:
            body = {"model": model, "prompt": "SELECT", "max_tokens": 2, "stream": True,
                    "temperature": 0}  # fmt: skip
            while not stop.is_set():
                with httpx.stream(
                    "POST", f"{router.url}/v1/completions", json=body, timeout=60
                ) as r:
                    r.read()
                    codes[(model, r.status_code)] = codes.get((model, r.status_code), 0) + 1

        with prom:

            def republish(body: dict[str, Any]) -> None:
                write_json(router.config_path, publish(body))  # the router reloads it

            controller = RolloutController(
                kube, PrometheusSource(prom.url), 1.0, lambda ns, n: threading.Lock(), republish
            )
            workers = [threading.Thread(target=traffic, args=(m,)) for m in ("sql", "help") * 3]
            for w in workers:
                w.start()
            try:
                deadline = time.monotonic() + 240
                phases: dict[str, str] = {}
                while time.monotonic() < deadline:
                    controller.evaluate(NS, NAME, lambda *e: events.append(e))
                    status = (kube.get_llmservice(NS, NAME) or {}).get("status") or {}
                    phases = {a["name"]: a["canary"]["phase"] for a in status.get("adapters", [])}
                    if phases == {"sql": "Promoted", "help": "RolledBack"}:
                        break
                    time.sleep(1.0)
                assert phases == {"sql": "Promoted", "help": "RolledBack"}, (phases, events)
                # Rolled back: the broken version gets nothing; the adapter answers again.
                before = dict(codes)
                time.sleep(3.0)
                m = router.metrics()
            finally:
                stop.set()
                for w in workers:
                    w.join(timeout=60)
    reasons = [r for _, r, _ in events]
    assert "AdapterCanaryPromoted" in reasons and "AdapterCanaryRolledBack" in reasons
    rolled = next(m for _, r, m in events if r == "AdapterCanaryRolledBack")
    assert rolled.startswith("adapter help:") and "error rate canary 100.0%" in rolled
    assert codes.get(("help", 502), 0) >= 10  # the broken version's requests, before
    assert codes.get(("help", 502), 0) == before.get(("help", 502), 0)  # ... and none since
    assert codes.get(("help", 200), 0) > before.get(("help", 200), 0)
    assert codes.get(("sql", 502), 0) == 0
    # The shadow version got copies of help's requests, on the same engines, and agreed.
    shadow = {"revision": "help@shadow"}
    compared = value(m, "kvpilot_router_shadow_compared_total", kind="greedy", **shadow)
    assert compared >= 3, m
    assert value(m, "kvpilot_router_shadow_exact_match_total", **shadow) >= 0.8 * compared
    # ... which the rollout controller summarised in status.adapters.
    adapters = ((kube.get_llmservice(NS, NAME) or {}).get("status") or {})["adapters"]
    help_shadow = next(a for a in adapters if a["name"] == "help")["shadow"]
    assert help_shadow["revision"] == "help@shadow" and help_shadow["greedyCompared"] >= 1
    final = json.loads(router.config_path.read_text())["adapters"]
    weights = {a["name"]: {v["role"]: v["weight"] for v in a["variants"]} for a in final}
    assert weights == {"sql": {"stable": 0, "canary": 100}, "help": {"stable": 100, "canary": 0}}
