"""Adapter canaries without a cluster: status.adapters started by the reconcile and carried into
the router's routes as shares, and the pure step that promotes or rolls back each canary (the
model canary's judge, on per-adapter figures). The loop with real engines, router and Prometheus
is tests/router/test_adapter_engines.py."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from kvpilot_operator.api.names import router_name
from kvpilot_operator.api.policies import resolve_spec
from kvpilot_operator.api.types import API_VERSION, CanaryAnalysis, LLMService, ShadowStatus
from kvpilot_operator.controller.manifests import RenderOptions
from kvpilot_operator.controller.reconcile import reconcile
from kvpilot_operator.rollout.adapters import (
    advance_adapters,
    evaluated,
    plan_adapters,
    version_of,
    with_shadows,
)

from tests.support.memkube import MemoryKube

NS, NAME = "team", "chat"
T0 = dt.datetime(2026, 12, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
CANARY = {"source": {"path": "/loras/sql-v2"}, "steps": [20, 100], "stepSeconds": 30}
SQL = {"name": "sql", "source": {"path": "/loras/sql-v1"}, "canary": CANARY}
HELP = {"name": "help", "source": {"path": "/loras/help"}}


def body(adapters: list[dict[str, Any]]) -> dict[str, Any]:
    spec = {"model": {"source": {"path": "smollm2"}}, "replicas": 1, "adapters": adapters}
    return {"apiVersion": API_VERSION, "kind": "LLMService",
            "metadata": {"name": NAME, "namespace": NS}, "spec": spec}  # fmt: skip


def routes(kube: MemoryKube) -> dict[str, Any]:
    cm = kube.get("v1", "ConfigMap", router_name(NAME), NS)
    assert cm is not None
    return json.loads(cm["data"]["routes.json"])


def shares(kube: MemoryKube, adapter: str) -> dict[str, int]:
    entry = next(a for a in routes(kube)["adapters"] if a["name"] == adapter)
    return {v["role"]: v["weight"] for v in entry["variants"]}


def test_the_reconcile_starts_a_canary_and_routes_its_first_share() -> None:
    kube = MemoryKube()
    kube.create(body([SQL, HELP]))
    out = reconcile(kube, kube.get_llmservice(NS, NAME) or {}, RenderOptions())
    assert out.problem is None
    status = (kube.get_llmservice(NS, NAME) or {})["status"]["adapters"]
    assert [s["name"] for s in status] == ["sql"]
    canary = status[0]["canary"]
    assert canary["phase"] == "Progressing" and canary["weight"] == 20
    assert canary["revision"] == version_of("/loras/sql-v2")
    assert canary["stableRevision"] == version_of("/loras/sql-v1")
    assert shares(kube, "sql") == {"stable": 80, "canary": 20}
    assert shares(kube, "help") == {"stable": 100}
    # A second reconcile leaves the controller's status alone.
    again = reconcile(kube, kube.get_llmservice(NS, NAME) or {}, RenderOptions())
    assert again.status is None or "adapters" not in again.status
    # The canary removed from the spec: its status goes, all requests go to the adapter.
    kube.update_spec(NS, NAME, body([{**SQL, "canary": None}, HELP])["spec"])
    reconcile(kube, kube.get_llmservice(NS, NAME) or {}, RenderOptions())
    assert "adapters" not in (kube.get_llmservice(NS, NAME) or {})["status"]
    assert shares(kube, "sql") == {"stable": 100}


def spec_of(adapters: list[dict[str, Any]]) -> Any:
    svc = LLMService.model_validate({"metadata": {"name": NAME}, "spec": body(adapters)["spec"]})
    return resolve_spec(svc.spec, None)


def analysis(canary_ms: float, errors: float) -> CanaryAnalysis:
    return CanaryAnalysis(
        canary_requests=40, stable_requests=160, canary_ttft_p95_ms=canary_ms,
        stable_ttft_p95_ms=100.0, canary_tpot_p95_ms=20.0, stable_tpot_p95_ms=20.0,
        canary_error_rate=errors, stable_error_rate=0.0,
    )  # fmt: skip


def test_a_good_canary_steps_to_promotion_and_a_bad_one_rolls_back() -> None:
    other = {"name": "help", "source": {"path": "/loras/help"},
             "canary": {**CANARY, "source": {"path": "/loras/help-broken"}}}  # fmt: skip
    spec = spec_of([SQL, other])
    _, statuses, news = plan_adapters(spec, None, "2026-12-01T12:00:00Z")
    assert news and evaluated(spec, statuses) == ["sql", "help"]
    later = T0 + dt.timedelta(seconds=31)
    verdicts = {"sql": (analysis(105.0, 0.0), None), "help": (analysis(100.0, 0.5), None)}
    statuses, events = advance_adapters(spec, statuses, verdicts, later)
    by_name = {s["name"]: s["canary"] for s in statuses or []}
    assert (by_name["sql"]["phase"], by_name["sql"]["weight"]) == ("Progressing", 100)
    assert (by_name["help"]["phase"], by_name["help"]["weight"]) == ("RolledBack", 0)
    reasons = {r for _, r, _ in events}
    assert reasons == {"AdapterCanaryStep", "AdapterCanaryRolledBack"}
    rolled_back = next(m for _, r, m in events if r == "AdapterCanaryRolledBack")
    assert rolled_back.startswith("adapter help:") and "error rate canary 50.0%" in rolled_back
    weights, _, news = plan_adapters(spec, statuses, "2026-12-01T12:00:31Z")
    assert weights == {"sql": 100, "help": 0} and not news
    # The last step passes: promoting, then promoted (no engine has to roll for it).
    statuses, events = advance_adapters(spec, statuses, verdicts, later + dt.timedelta(seconds=31))
    statuses, events2 = advance_adapters(spec, statuses, {}, later + dt.timedelta(seconds=32))
    assert {s["name"]: s["canary"]["phase"] for s in statuses or []} == {
        "sql": "Promoted", "help": "RolledBack"
    }  # fmt: skip
    assert [r for _, r, _ in events + events2] == [
        "AdapterCanaryPromoting",
        "AdapterCanaryPromoted",
    ]
    assert evaluated(spec, statuses) == []


def test_a_new_canary_source_starts_over() -> None:
    spec = spec_of([SQL])
    _, statuses, _ = plan_adapters(spec, None, "2026-12-01T12:00:00Z")
    statuses, _ = advance_adapters(
        spec, statuses, {"sql": (analysis(100.0, 0.9), None)}, T0 + dt.timedelta(seconds=31)
    )
    assert statuses is not None and statuses[0]["canary"]["phase"] == "RolledBack"
    fixed = spec_of([{**SQL, "canary": {**CANARY, "source": {"path": "/loras/sql-v3"}}}])
    weights, restarted, news = plan_adapters(fixed, statuses, "2026-12-01T12:05:00Z")
    assert news and weights == {"sql": 20}
    assert restarted is not None and restarted[0]["canary"]["phase"] == "Progressing"


def test_a_shadows_figures_are_kept_beside_its_canary() -> None:
    shadowed = {**SQL, "shadow": {"source": {"path": "/loras/sql-v3"}}}
    alone = {**HELP, "shadow": {"source": {"path": "/loras/help-v2"}}}
    spec = spec_of([shadowed, alone])
    _, statuses, _ = plan_adapters(spec, None, "2026-12-01T12:00:00Z")
    figures = {
        "sql": ShadowStatus(revision="sql@shadow", mirrored=12, compared=10, greedy_compared=10),
        "help": ShadowStatus(revision="help@shadow", mirrored=3),
    }
    statuses = with_shadows(spec, statuses, figures)
    assert {s["name"]: s["shadow"]["mirrored"] for s in statuses or []} == {"sql": 12, "help": 3}
    # The canary's step and the reconcile's plan leave the shadows' figures as they were.
    stepped, _ = advance_adapters(
        spec, statuses, {"sql": (analysis(100.0, 0.0), None)}, T0 + dt.timedelta(seconds=31)
    )
    assert stepped is not None and [s["name"] for s in stepped] == ["sql", "help"]
    assert stepped[0]["canary"]["weight"] == 100 and stepped[0]["shadow"]["mirrored"] == 12
    assert stepped[1] == statuses[1]  # type: ignore[index]
    _, planned, news = plan_adapters(spec, stepped, "2026-12-01T12:01:00Z")
    assert planned == stepped and not news


def test_a_removed_shadows_figures_go_from_status() -> None:
    alone = {**HELP, "shadow": {"source": {"path": "/loras/help-v2"}}}
    spec = spec_of([alone])
    _, statuses, _ = plan_adapters(spec, None, "2026-12-01T12:00:00Z")
    statuses = with_shadows(spec, statuses, {"help": ShadowStatus(revision="help@shadow")})
    assert statuses is not None and statuses[0]["shadow"]["revision"] == "help@shadow"
    # No loop renews it once the spec has no shadow: the reconcile's plan drops it.
    _, planned, news = plan_adapters(spec_of([HELP]), statuses, "2026-12-01T12:01:00Z")
    assert planned is None and news
