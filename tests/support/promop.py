"""The Prometheus Operator's side of a PodMonitor, restated for tests that have no Prometheus
Operator and no nodes: the scrape job it generates, the `__meta_kubernetes_pod_*` labels
kubernetes_sd would give a pod, and a small evaluator of Prometheus relabeling.

`scrape_job` follows the Prometheus Operator's generator for PodMonitors (pkg/prometheus/
promcfg.go, generatePodMonitorConfig): keep pods whose labels match the selector, keep the named
container port, set `namespace`, `container`, `pod`, `job` (<namespace>/<PodMonitor>) and
`endpoint`, then the PodMonitor's own relabelings. kubernetes_sd_configs needs an API server with
nodes and pod IPs (and Debian's Prometheus is built without it), so the job it returns takes
`static_configs` whose target labels stand in for the `__meta_*` labels kubernetes_sd would set.
"""

from __future__ import annotations

import re
from typing import Any

Doc = dict[str, Any]
META = "__meta_kubernetes_pod_"


def sanitize(name: str) -> str:
    """What Prometheus does to a Kubernetes label name in a `__meta_*` label name."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _selector_relabelings(selector: Doc) -> list[Doc]:
    out = []
    for key, value in (selector.get("matchLabels") or {}).items():
        out.append(
            {
                "action": "keep",
                "source_labels": [
                    f"{META}label_{sanitize(key)}",
                    f"{META}labelpresent_{sanitize(key)}",
                ],
                "regex": f"({value});true",
            }
        )
    for expr in selector.get("matchExpressions") or []:
        key, op = sanitize(expr["key"]), expr["operator"]
        if op in ("In", "NotIn"):
            out.append(
                {
                    "action": "keep" if op == "In" else "drop",
                    "source_labels": [f"{META}label_{key}", f"{META}labelpresent_{key}"],
                    "regex": f"({'|'.join(expr['values'])});true",
                }
            )
        else:
            out.append(
                {
                    "action": "keep" if op == "Exists" else "drop",
                    "source_labels": [f"{META}labelpresent_{key}"],
                    "regex": "true",
                }
            )
    return out


def _relabeling(r: Doc) -> Doc:
    """A PodMonitor RelabelConfig (camelCase) as Prometheus config (snake_case)."""
    names = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    return {names.get(k, k): (v.lower() if k == "action" else v) for k, v in r.items()}


def scrape_job(pm: Doc, endpoint: int, targets: list[tuple[str, dict[str, str]]]) -> Doc:
    """The scrape job for one podMetricsEndpoint of a PodMonitor, over static stand-in targets
    (address, `__meta_*` labels)."""
    ep = pm["spec"]["podMetricsEndpoints"][endpoint]
    ns, name = pm["metadata"]["namespace"], pm["metadata"]["name"]
    relabel: list[Doc] = [
        {"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"},
        {"action": "drop", "source_labels": [f"{META}phase"], "regex": "(Failed|Succeeded)"},
        *_selector_relabelings(pm["spec"]["selector"]),
        {"action": "keep", "source_labels": [f"{META}container_port_name"], "regex": ep["port"]},
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": [f"{META}container_name"], "target_label": "container"},
        {"source_labels": [f"{META}name"], "target_label": "pod"},
        {"target_label": "job", "replacement": f"{ns}/{name}"},
        {"target_label": "endpoint", "replacement": ep["port"]},
        *(_relabeling(r) for r in ep.get("relabelings") or []),
    ]
    return {
        "job_name": f"podMonitor/{ns}/{name}/{endpoint}",
        "honor_labels": bool(ep.get("honorLabels", False)),
        "metrics_path": ep.get("path", "/metrics"),
        "static_configs": [{"targets": [addr], "labels": labels} for addr, labels in targets],
        "relabel_configs": relabel,
    }


def pod_meta_labels(
    pod_template: Doc, namespace: str, pod_name: str, port_name: str
) -> dict[str, str]:
    """The `__meta_kubernetes_*` labels kubernetes_sd (role: pod) gives the target of one container
    port of a pod made from this template, running."""
    labels = {
        "__meta_kubernetes_namespace": namespace,
        f"{META}name": pod_name,
        f"{META}phase": "Running",
        f"{META}ready": "true",
    }
    for key, value in (pod_template["metadata"].get("labels") or {}).items():
        labels[f"{META}label_{sanitize(key)}"] = value
        labels[f"{META}labelpresent_{sanitize(key)}"] = "true"
    for key, value in (pod_template["metadata"].get("annotations") or {}).items():
        labels[f"{META}annotation_{sanitize(key)}"] = value
        labels[f"{META}annotationpresent_{sanitize(key)}"] = "true"
    for c in pod_template["spec"]["containers"]:
        for p in c.get("ports") or []:
            if p.get("name") == port_name:
                labels[f"{META}container_name"] = c["name"]
                labels[f"{META}container_port_name"] = port_name
                labels[f"{META}container_port_number"] = str(p["containerPort"])
    return labels


def relabel(labels: dict[str, str], configs: list[Doc]) -> dict[str, str] | None:
    """Prometheus relabeling (replace, keep, drop, labelmap, labeldrop, labelkeep) of one target's
    labels; None when the target is dropped. `__`-prefixed labels are removed at the end, as
    Prometheus does after relabeling."""
    out = dict(labels)
    for c in configs:
        action = c.get("action", "replace")
        regex = re.compile(f"^(?:{c.get('regex', '(.*)')})$")
        value = c.get("separator", ";").join(out.get(s, "") for s in c.get("source_labels", []))
        replacement = re.sub(r"\$\{?(\d+)\}?", r"\\\1", c.get("replacement", "$1"))
        if action == "keep" and not regex.match(value):
            return None
        if action == "drop" and regex.match(value):
            return None
        if action == "replace":
            m = regex.match(value)
            if m:
                target = m.expand(c["target_label"].replace("$", "\\"))
                new = m.expand(replacement)
                if new:
                    out[target] = new
                else:
                    out.pop(target, None)
        elif action == "labelmap":
            for name, v in list(out.items()):
                m = regex.match(name)
                if m:
                    out[m.expand(replacement)] = v
        elif action == "labeldrop":
            out = {k: v for k, v in out.items() if not regex.match(k)}
        elif action == "labelkeep":
            out = {k: v for k, v in out.items() if regex.match(k)}
    return {k: v for k, v in out.items() if not k.startswith("__")}
