"""The chart's PodMonitors (for a Prometheus run by the Prometheus Operator, as in
kube-prometheus-stack): they select every engine, canary, shadow and router pod the operator
renders and nothing else, and the scrape job the Prometheus Operator makes of them gives the series
exactly the labels the autoscaler's queries, the recording rules and the dashboard select on.

There is no Prometheus Operator here: tests.support.promop restates its PodMonitor -> scrape job
translation. The relabelings are applied twice: by a small evaluator (fast), and by the real
Prometheus 2.42 over `static_configs` whose target labels stand in for the `__meta_kubernetes_*`
labels kubernetes_sd would give the rendered pods (kubernetes_sd needs a cluster with nodes).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from kvpilot_operator.api.names import ENGINE_SERIES, PROMETHEUS_SELECTOR, ROUTER_SERIES
from kvpilot_operator.local.procs import free_ports
from kvpilot_operator.local.prometheus import LocalPrometheus
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from tests.support.helm import Doc, one, template
from tests.support.promop import pod_meta_labels, relabel, scrape_job
from tests.support.rendered import EVERYTHING, EXAMPLES, kvpilot_render, pod_templates, with_canary

NAMESPACE, SERVICE = "team-a", "everything"


def monitors(docs: list[Doc]) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "PodMonitor"}


def matches(selector: Doc, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions) against a pod's labels."""
    if not selector["matchLabels"].items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        present, value = e["key"] in labels, labels.get(e["key"])
        ok = {
            "In": present and value in e["values"],
            "NotIn": not present or value not in e["values"],
            "Exists": present,
            "DoesNotExist": not present,
        }[e["operator"]]
        if not ok:
            return False
    return True


def selects(query_selector: str, labels: dict[str, str]) -> bool:
    """Whether PromQL label matchers (=, !=, =~, !~) select a series with these labels."""
    for name, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', query_selector):
        have = labels.get(name, "")
        hit = re.fullmatch(value, have) is not None if "~" in op else have == value
        if hit == op.startswith("!"):
            return False
    return True


def service_selector(namespace: str = NAMESPACE, name: str = SERVICE) -> str:
    return PROMETHEUS_SELECTOR.format(namespace=namespace, name=name)


def rendered_pods() -> list[tuple[str, Doc]]:
    """(pod name stand-in, pod template) of every Deployment of a service mid-canary with a
    shadow, and of each example in docs/examples."""
    objects = with_canary(EVERYTHING)
    for path in EXAMPLES:
        text = path.read_text()
        if "kind: LLMService" in text:
            objects += kvpilot_render(text)
    return [
        (f"{t['metadata']['labels']['kvpilot.io/llmservice']}-{i}", t)
        for i, t in enumerate(pod_templates(objects))
    ]


# --- helm template ------------------------------------------------------------------------------


def test_podmonitors_are_off_by_default_and_follow_their_values(helm: str) -> None:
    assert not monitors(template(helm))
    docs = template(
        helm,
        "--set", "monitoring.podMonitor.enabled=true",
        "--set", "monitoring.podMonitor.labels.release=kube-prometheus-stack",
        "--set", "monitoring.podMonitor.interval=15s",
    )  # fmt: skip
    pms = monitors(docs)
    assert set(pms) == {"kv-kvpilot-llmservices", "kv-kvpilot-operator"}
    for pm in pms.values():
        assert pm["apiVersion"] == "monitoring.coreos.com/v1"
        assert pm["metadata"]["namespace"] == "kvpilot-system"
        assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert all(ep["interval"] == "15s" for ep in pm["spec"]["podMetricsEndpoints"])
    assert pms["kv-kvpilot-llmservices"]["spec"]["namespaceSelector"] == {"any": True}
    scoped = monitors(
        template(
            helm,
            "--set",
            "monitoring.podMonitor.enabled=true",
            "--set",
            "operator.watchNamespaces={team-a,team-b}",
        )
    )
    assert scoped["kv-kvpilot-llmservices"]["spec"]["namespaceSelector"] == {
        "matchNames": ["team-a", "team-b"]
    }
    # Without the operator's metrics port there is nothing of the operator's to scrape.
    off = template(
        helm, "--set", "monitoring.podMonitor.enabled=true", "--set", "metrics.enabled=false"
    )
    assert set(monitors(off)) == {"kv-kvpilot-llmservices"}
    # The PrometheusRule is gated the same way: its own value, off by default.
    assert "PrometheusRule" not in {d["kind"] for d in docs}


def test_podmonitor_selects_every_rendered_pod_and_gives_the_queries_labels(helm: str) -> None:
    docs = template(helm, "--set", "monitoring.podMonitor.enabled=true")
    pms = monitors(docs)
    engines_pm, operator_pm = pms["kv-kvpilot-llmservices"], pms["kv-kvpilot-operator"]
    (endpoint,) = engines_pm["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    operator_pod = one(docs, "Deployment")["spec"]["template"]
    assert not matches(engines_pm["spec"]["selector"], operator_pod["metadata"]["labels"])
    assert matches(operator_pm["spec"]["selector"], operator_pod["metadata"]["labels"])

    pods = rendered_pods()
    components = {t["metadata"]["labels"]["app.kubernetes.io/component"] for _, t in pods}
    assert components == {"engine", "shadow", "router"}
    for name, pod in pods:
        labels = pod["metadata"]["labels"]
        assert matches(engines_pm["spec"]["selector"], labels), labels
        assert not matches(operator_pm["spec"]["selector"], labels)
        # The Prometheus Operator's job, and relabeling as Prometheus does it.
        meta = pod_meta_labels(pod, NAMESPACE, name, "http")
        assert meta["__meta_kubernetes_pod_container_port_name"] == "http", f"{name}: no http port"
        job = scrape_job(engines_pm, 0, [("10.0.0.1:8000", meta)])
        target = relabel({"__address__": "10.0.0.1:8000", **meta}, job["relabel_configs"])
        assert target is not None, f"{name} is dropped by the scrape job"
        assert target["namespace"] == NAMESPACE
        service = labels["kvpilot.io/llmservice"]
        assert target["kvpilot_io_llmservice"] == service
        assert selects(service_selector(NAMESPACE, service), target)
        component = labels["app.kubernetes.io/component"]
        assert selects(ENGINE_SERIES, target) == (component == "engine")
        assert selects(ROUTER_SERIES, target) == (component == "router")


# --- the real Prometheus ----------------------------------------------------------------------


@pytest.fixture
def endpoints() -> Iterator[tuple[str, str]]:
    """Two /metrics endpoints on loopback: one for every kvpilot pod (each target below is this
    address with other labels), and the operator's, with an autoscaler series that names its
    LLMService in its own `namespace` label."""
    registry = CollectorRegistry()
    Gauge(
        "kvpilot_autoscaler_desired_replicas", "Replicas.", ["namespace", "llmservice"],
        registry=registry,
    ).labels(NAMESPACE, SERVICE).set(3)  # fmt: skip
    servers = []
    addresses = []
    for reg in (CollectorRegistry(), registry):
        port = free_ports(1)[0]
        servers.append(start_http_server(port, addr="127.0.0.1", registry=reg))
        addresses.append(f"127.0.0.1:{port}")
    try:
        yield addresses[0], addresses[1]
    finally:
        for server, thread in servers:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)


@pytest.mark.slow
def test_real_prometheus_scrapes_with_the_labels_the_queries_select(
    helm: str, endpoints: tuple[str, str]
) -> None:
    pods_addr, operator_addr = endpoints
    docs = template(helm, "--set", "monitoring.podMonitor.enabled=true")
    pms = monitors(docs)
    pods = [
        (n, t)
        for n, t in rendered_pods()
        if t["metadata"]["labels"]["kvpilot.io/llmservice"] == SERVICE
    ]
    assert len(pods) == 4  # stable, canary, shadow, router
    targets = [(pods_addr, pod_meta_labels(t, NAMESPACE, n, "http")) for n, t in pods]
    operator_pod = one(docs, "Deployment")["spec"]["template"]
    operator_meta = pod_meta_labels(operator_pod, "kvpilot-system", "kv-kvpilot-0", "metrics")
    # Each PodMonitor is offered every pod, as kubernetes_sd would: the selectors pick.
    everything = [*targets, (operator_addr, operator_meta)]
    jobs = [
        scrape_job(pms["kv-kvpilot-llmservices"], 0, everything),
        scrape_job(pms["kv-kvpilot-operator"], 0, [*targets[:1], (operator_addr, operator_meta)]),
    ]
    with LocalPrometheus(scrape_interval=1.0) as prom:
        config: dict[str, Any] = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": jobs,
        }
        prom.config_path.write_text(json.dumps(config, indent=2))
        prom.reload()
        sel = service_selector()
        up = prom.wait_for_series(f"count(up{{{sel}}} == 1) == 4", timeout=30)
        assert up
        engines = prom.query(f"up{{{sel},{ENGINE_SERIES}}}")
        assert sorted(s["metric"]["kvpilot_io_track"] for s in engines) == ["canary", "stable"]
        routers = prom.query(f"up{{{sel},{ROUTER_SERIES}}}")
        assert len(routers) == 1 and routers[0]["metric"]["container"] == "router"
        # The rules aggregate by (namespace, kvpilot_io_llmservice); the operator's pod is not
        # among the kvpilot pods' targets.
        by = prom.query('count by (namespace, kvpilot_io_llmservice) (up{job=~".*llmservices"})')
        assert [(s["metric"], s["value"][1]) for s in by] == [
            ({"namespace": NAMESPACE, "kvpilot_io_llmservice": SERVICE}, "4")
        ]
        # The dashboard's replicas panel: the operator's own `namespace` label kept
        # (honorLabels), not renamed to exported_namespace under the operator's namespace.
        desired = prom.wait_for_series(
            f'kvpilot_autoscaler_desired_replicas{{namespace="{NAMESPACE}",llmservice="{SERVICE}"}}',
            timeout=30,
        )
        assert desired[0]["value"][1] == "3"
        assert desired[0]["metric"]["job"] == "kvpilot-system/kv-kvpilot-operator"
