"""The chart's SLO observability: recording rules and alerts checked and unit-tested by Debian's
promtool, the dashboard's queries accepted by a real Prometheus, both shipped by the chart as
generated, and the operator's SLO series they join on."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from kvpilot_operator.api.policies import resolve_spec
from kvpilot_operator.api.types import LLMService
from kvpilot_operator.local.prometheus import LocalPrometheus, ensure_prometheus
from kvpilot_operator.observability.dashboard import dashboard, dashboard_queries
from kvpilot_operator.observability.files import DASHBOARD_PATH, RULES_PATH, write
from kvpilot_operator.observability.rules import rules
from kvpilot_operator.observability.slo_series import THRESHOLD, bucket_edge, export, slo_points
from prometheus_client import REGISTRY

from tests.support.helm import one, template

PROMTOOL_TESTS = Path(__file__).parent / "promtool" / "kvpilot_rules_test.yaml"


@pytest.fixture(scope="module")
def promtool() -> Path:
    return ensure_prometheus(progress=False) / "promtool"


def test_generated_files_are_up_to_date() -> None:
    assert write(check=True) == [], "run `kvpilot observability`"


@pytest.mark.slow
def test_promtool_checks_and_unit_tests_the_rules(promtool: Path) -> None:
    check = subprocess.run(
        [str(promtool), "check", "rules", str(RULES_PATH)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    found = int(re.search(r"SUCCESS: (\d+) rules found", check.stdout).group(1))  # type: ignore[union-attr]
    assert found == sum(len(g["rules"]) for g in rules()["groups"])
    unit = subprocess.run(
        [str(promtool), "test", "rules", PROMTOOL_TESTS.name],
        cwd=PROMTOOL_TESTS.parent,
        capture_output=True,
        text=True,
    )
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout, unit.stdout + unit.stderr
    # Every alert the rules define has a unit test that expects it to fire.
    tested = yaml.safe_load(PROMTOOL_TESTS.read_text())
    fired = {
        case["alertname"]
        for t in tested["tests"]
        for case in t.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    alerts = {r["alert"] for g in rules()["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == fired


@pytest.mark.slow
def test_dashboard_queries_are_valid_promql() -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    with LocalPrometheus() as prom:
        for q in queries:
            expr = q.replace("$namespace", "ns").replace("$llmservice", "chat")
            expr = expr.replace("$__rate_interval", "1m")
            prom.query(expr)  # raises PrometheusQueryError on a syntax error
    board = dashboard()
    names = [v["name"] for v in board["templating"]["list"]]
    assert names == ["datasource", "namespace", "llmservice"]
    titles = " ".join(p["title"] for p in board["panels"])
    for what in ("TTFT", "TPOT", "error budget", "Replicas", "Queue", "KV", "Throughput"):
        assert what in titles
    assert "Canary" in titles and "Shadow" in titles
    assert "Speculative decoding" in titles


def test_chart_ships_the_generated_rules_and_dashboard(helm: str) -> None:
    docs = template(
        helm,
        "--set", "monitoring.prometheusRule.enabled=true",
        "--set", "monitoring.prometheusRule.labels.release=kube-prometheus",
        "--set", "monitoring.dashboards.enabled=true",
    )  # fmt: skip
    rule = one(docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus"
    assert rule["spec"] == yaml.safe_load(RULES_PATH.read_text())
    dashboards = [
        d for d in docs if d["kind"] == "ConfigMap" and "dashboards" in d["metadata"]["name"]
    ]
    (cm,) = dashboards
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["kvpilot-llmservice.json"]) == json.loads(
        DASHBOARD_PATH.read_text()
    )
    # Off by default: no Prometheus Operator CRD is assumed.
    default = template(helm)
    assert "PrometheusRule" not in {d["kind"] for d in default}


def test_slo_series_name_the_bucket_edge_at_or_below_the_target() -> None:
    assert bucket_edge("ttft", 0.5) == 0.5
    assert bucket_edge("ttft", 0.45) == 0.4  # between edges: the stricter one
    assert bucket_edge("tpot", 0.1) == 0.1
    svc = LLMService.model_validate(
        {
            "metadata": {"name": "chat", "namespace": "ns"},
            "spec": {
                "model": {"source": {"path": "smollm2"}},
                "slo": {"ttft": {"percentile": 99, "targetMs": 250}},
            },
        }
    )
    spec = resolve_spec(svc.spec, None)
    points = slo_points(spec)
    assert points[0] == ("ttft", "0.25", 0.99, 0.25, 99)
    assert points[1][0] == "tpot"  # from the built-in defaults
    export("ns", "chat", spec)
    labels = {"llmservice_namespace": "ns", "llmservice": "chat", "slo": "ttft", "le": "0.25"}
    assert REGISTRY.get_sample_value("kvpilot_llmservice_slo_threshold", labels) == 1.0
    objective = {"llmservice_namespace": "ns", "llmservice": "chat", "slo": "ttft"}
    assert REGISTRY.get_sample_value("kvpilot_llmservice_slo_objective", objective) == 0.99
    export("ns", "chat", None)
    assert REGISTRY.get_sample_value("kvpilot_llmservice_slo_threshold", labels) is None
    assert all(k[:2] != ("ns", "chat") for k in THRESHOLD._metrics)
