"""What the chart ships for Prometheus and Grafana, generated here so that the rules, the alerts,
the dashboard and the metric names they read cannot drift apart:

- `charts/kvpilot/files/rules/kvpilot.rules.yaml`: recording rules for each LLMService's SLIs
  (share of requests with TTFT, and of tokens with TPOT, under the SLO's threshold, over 5m..30d)
  and error-budget burn rates, and multi-window, multi-burn-rate alerts (the SRE workbook's
  14.4x/6x/3x/1x pairs for a 30-day budget), plus a few symptom alerts. The chart wraps the same
  groups in a PrometheusRule; plain Prometheus loads the file.
- `charts/kvpilot/files/dashboards/kvpilot-llmservice.json`: one Grafana dashboard per
  LLMService (namespace and service variables).

Every rule reads the SLO from the operator's `kvpilot_llmservice_slo_*` series
(`slometrics.py`), so one rule set serves services with different targets. `kvpilot observability`
writes both files; a test fails when they are stale.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from kvpilot_operator.crds import REPO_ROOT as ROOT

CHART_FILES = ROOT / "charts" / "kvpilot" / "files"
RULES_PATH = CHART_FILES / "rules" / "kvpilot.rules.yaml"
DASHBOARD_PATH = CHART_FILES / "dashboards" / "kvpilot-llmservice.json"

BY = "namespace, kvpilot_io_llmservice"
WHO = "{{ $labels.namespace }}/{{ $labels.kvpilot_io_llmservice }}"  # in alert annotations
ENGINES = 'app_kubernetes_io_component!~"shadow|router"'
ROUTERS = 'app_kubernetes_io_component="router"'
WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
# SLI name -> the engine histogram whose buckets count good events.
SLIS = {
    "ttft": ("vllm:time_to_first_token_seconds", "requests"),
    "tpot": ("vllm:inter_token_latency_seconds", "output tokens"),
}
# (alert suffix, long window, short window, burn factor, for, severity): the SRE workbook's
# multiwindow, multi-burn-rate alerts for a 30-day error budget.
BURN_ALERTS = (
    ("Fast", "1h", "5m", 14.4, "2m", "page"),
    ("Medium", "6h", "30m", 6, "15m", "page"),
    ("Slow", "1d", "2h", 3, "1h", "ticket"),
    ("Slower", "3d", "6h", 1, "3h", "ticket"),
)


def _as_service(metric: str) -> str:
    """The operator's per-service series under the engines' label names."""
    return (
        f'label_replace(label_replace({metric}, "namespace", "$1", "llmservice_namespace", "(.*)"),'
        f' "kvpilot_io_llmservice", "$1", "llmservice", "(.*)")'
    )


def rules() -> dict[str, Any]:
    slo_series = [
        {
            "record": "kvpilot:slo_threshold:le",
            "expr": f"max by ({BY}, slo, le) ({_as_service('kvpilot_llmservice_slo_threshold')})",
        },
        {
            "record": "kvpilot:slo_objective:ratio",
            "expr": f"max by ({BY}, slo) ({_as_service('kvpilot_llmservice_slo_objective')})",
        },
    ]
    sli: list[dict[str, Any]] = []
    for slo, (histogram, _) in SLIS.items():
        for w in WINDOWS:
            good = (
                f"sum by ({BY}) (rate({histogram}_bucket{{{ENGINES}}}[{w}])"
                f' * on ({BY}, le) group_left kvpilot:slo_threshold:le{{slo="{slo}"}})'
            )
            total = f"sum by ({BY}) (rate({histogram}_count{{{ENGINES}}}[{w}]))"
            sli.append({"record": f"kvpilot:{slo}_good:ratio_rate{w}", "expr": f"{good} / {total}"})
        # 30 days from the hourly ratios: cheap, and what the error-budget panel shows.
        sli.append(
            {
                "record": f"kvpilot:{slo}_good:ratio_rate30d",
                "expr": f"avg_over_time(kvpilot:{slo}_good:ratio_rate1h[30d])",
            }
        )
        for w in (*WINDOWS, "30d"):
            sli.append(
                {
                    "record": f"kvpilot:{slo}_burn:rate{w}",
                    "expr": f"(1 - kvpilot:{slo}_good:ratio_rate{w}) / on ({BY}) "
                    f'(1 - kvpilot:slo_objective:ratio{{slo="{slo}"}})',
                }
            )
        sli.append(
            {
                "record": f"kvpilot:{slo}_error_budget:remaining30d",
                "expr": f"1 - kvpilot:{slo}_burn:rate30d",
            }
        )
    alerts: list[dict[str, Any]] = []
    for slo, (_, unit) in SLIS.items():
        name = slo.upper()
        for suffix, long, short, factor, wait, severity in BURN_ALERTS:
            alerts.append(
                {
                    "alert": f"KvpilotSLO{name}BudgetBurn{suffix}",
                    "expr": f"kvpilot:{slo}_burn:rate{long} > {factor}"
                    f" and kvpilot:{slo}_burn:rate{short} > {factor}",
                    "for": wait,
                    "labels": {"severity": severity, "slo": slo},
                    "annotations": {
                        "summary": f"{WHO} burns its {name} error budget {factor}x too fast",
                        "description": f"Over {long} and {short}, the share of {unit} slower than "
                        f"the {name} SLO is more than {factor} times what the objective allows.",
                    },
                }
            )
    alerts += [
        {
            "alert": "KvpilotRouterErrors",
            "expr": f"sum by ({BY}) (rate(kvpilot_router_requests_total"
            f'{{{ROUTERS},code=~"5.."}}[5m])) / sum by ({BY}) '
            f"(rate(kvpilot_router_requests_total{{{ROUTERS}}}[5m])) > 0.05",
            "for": "5m",
            "labels": {"severity": "page"},
            "annotations": {
                "summary": "{{ $labels.namespace }}/{{ $labels.kvpilot_io_llmservice }}: more "
                "than 5% of requests fail at the router",
                "description": "5xx responses to clients (engines down, overloaded, timeouts).",
            },
        },
        {
            "alert": "KvpilotEngineDown",
            "expr": f'up{{{ENGINES},kvpilot_io_llmservice!=""}} == 0',
            "for": "5m",
            "labels": {"severity": "ticket"},
            "annotations": {
                "summary": "{{ $labels.namespace }}/{{ $labels.kvpilot_io_llmservice }}: an "
                "engine pod has not answered scrapes for 5 minutes",
                "description": "Instance {{ $labels.instance }}.",
            },
        },
        {
            "alert": "KvpilotKVCacheFull",
            "expr": f"max by ({BY}) (vllm:kv_cache_usage_perc{{{ENGINES}}}) > 0.95",
            "for": "10m",
            "labels": {"severity": "ticket"},
            "annotations": {
                "summary": "{{ $labels.namespace }}/{{ $labels.kvpilot_io_llmservice }}: KV "
                "cache over 95% for 10 minutes",
                "description": "Requests are being preempted; raise kvCacheMemory or replicas.",
            },
        },
        {
            "alert": "KvpilotRequestsQueuedAtRouter",
            "expr": f"sum by ({BY}) (kvpilot_router_waiting_requests{{{ROUTERS}}}) > 0",
            "for": "5m",
            "labels": {"severity": "ticket"},
            "annotations": {
                "summary": "{{ $labels.namespace }}/{{ $labels.kvpilot_io_llmservice }}: "
                "requests wait at the router for 5 minutes",
                "description": "No engine is ready (scaled to zero and not waking?) or the "
                "router's in-flight limit is reached.",
            },
        },
    ]
    return {
        "groups": [
            {"name": "kvpilot-slo-targets", "interval": "30s", "rules": slo_series},
            {"name": "kvpilot-sli", "interval": "30s", "rules": sli},
            {"name": "kvpilot-alerts", "rules": alerts},
        ]
    }


# --- Grafana ----------------------------------------------------------------------------------

SVC = 'namespace="$namespace",kvpilot_io_llmservice="$llmservice"'
OP = 'llmservice_namespace="$namespace",llmservice="$llmservice"'
AUTOSCALER = 'namespace="$namespace",llmservice="$llmservice"'
RI = "$__rate_interval"
SLO_SERIES = "kvpilot_llmservice_slo_objective"


def _q(metric: str, q: float, sel: str, by: str = "le") -> str:
    return f"histogram_quantile({q}, sum by ({by}) (rate({metric}_bucket{{{sel}}}[{RI}])))"


def _panel(
    title: str, targets: list[tuple[str, str]], unit: str, x: int, y: int, w: int = 12
) -> dict[str, Any]:
    return {
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": w, "h": 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
            for i, (legend, expr) in enumerate(targets)
        ],
    }


def dashboard() -> dict[str, Any]:
    engines = f"{SVC},{ENGINES}"
    routers = f"{SVC},{ROUTERS}"
    panels = []
    for row, (slo, (histogram, _)) in enumerate(SLIS.items()):
        name = slo.upper()
        panels.append(
            _panel(
                f"{name} p50 / p95 / p99 against the SLO",
                [
                    *((f"p{int(q * 100)}", _q(histogram, q, engines)) for q in (0.5, 0.95, 0.99)),
                    (
                        "SLO p{{percentile}}",
                        f'kvpilot_llmservice_slo_target_seconds{{{OP},slo="{slo}"}}',
                    ),
                ],
                "s",
                0,
                row * 8,
            )
        )
        panels.append(
            _panel(
                f"{name} error budget remaining (30d) and burn rate",
                [
                    ("budget remaining", f"kvpilot:{slo}_error_budget:remaining30d{{{SVC}}}"),
                    ("burn 1h", f"kvpilot:{slo}_burn:rate1h{{{SVC}}}"),
                    ("burn 6h", f"kvpilot:{slo}_burn:rate6h{{{SVC}}}"),
                ],
                "short",
                12,
                row * 8,
            )
        )
    y = 16
    panels += [
        _panel(
            "Replicas: desired, current, ready",
            [
                ("desired", f"kvpilot_autoscaler_desired_replicas{{{AUTOSCALER}}}"),
                ("current", f"kvpilot_autoscaler_current_replicas{{{AUTOSCALER}}}"),
                ("ready", f"kvpilot_autoscaler_ready_replicas{{{AUTOSCALER}}}"),
            ],
            "short",
            0,
            y,
        ),
        _panel(
            "Queue: engines and router",
            [
                ("engines waiting", f"sum(vllm:num_requests_waiting{{{engines}}})"),
                ("engines running", f"sum(vllm:num_requests_running{{{engines}}})"),
                ("router waiting", f"sum(kvpilot_router_waiting_requests{{{routers}}})"),
            ],
            "short",
            12,
            y,
        ),
        _panel(
            "KV-cache usage",
            [("{{pod}}{{instance}}", f"vllm:kv_cache_usage_perc{{{engines}}}")],
            "percentunit",
            0,
            y + 8,
        ),
        _panel(
            "Throughput",
            [
                ("output tokens/s", f"sum(rate(vllm:generation_tokens_total{{{engines}}}[{RI}]))"),
                ("prompt tokens/s", f"sum(rate(vllm:prompt_tokens_total{{{engines}}}[{RI}]))"),
                ("requests/s", f"sum(rate(kvpilot_router_requests_total{{{routers}}}[{RI}]))"),
            ],
            "short",
            12,
            y + 8,
        ),
        _panel(
            "Canary: traffic share by revision",
            [
                (
                    "{{revision}}",
                    f"sum by (revision) (rate(kvpilot_router_requests_total{{{routers}}}[{RI}]))"
                    f" / scalar(sum(rate(kvpilot_router_requests_total{{{routers}}}[{RI}])))",
                )
            ],
            "percentunit",
            0,
            y + 16,
        ),
        _panel(
            "Canary: client-side TTFT and TPOT p95 by revision",
            [
                (
                    "TTFT {{revision}}",
                    _q("kvpilot_router_ttft_seconds", 0.95, routers, "le, revision"),
                ),
                (
                    "TPOT {{revision}}",
                    _q("kvpilot_router_tpot_seconds", 0.95, routers, "le, revision"),
                ),
            ],
            "s",
            12,
            y + 16,
        ),
        _panel(
            "Canary: error rate by revision",
            [
                (
                    "{{revision}}",
                    # "or 0 * ...": a revision without a single 5xx shows 0, not a gap.
                    "(sum by (revision) (rate(kvpilot_router_requests_total"
                    f'{{{routers},code=~"5.."}}[{RI}])) or 0 * sum by (revision) '
                    f"(rate(kvpilot_router_requests_total{{{routers}}}[{RI}]))) / sum by "
                    f"(revision) (rate(kvpilot_router_requests_total{{{routers}}}[{RI}]))",
                )
            ],
            "percentunit",
            0,
            y + 24,
        ),
        _panel(
            "Shadow: greedy agreement and latency delta (p50)",
            [
                (
                    "greedy agreement",
                    f"sum(rate(kvpilot_router_shadow_exact_match_total{{{routers}}}[{RI}]))"
                    " / sum(rate(kvpilot_router_shadow_compared_total"
                    f'{{{routers},kind="greedy"}}[{RI}]))',
                ),
                (
                    "e2e delta p50 (s)",
                    _q("kvpilot_router_shadow_latency_delta_seconds", 0.5, routers),
                ),
            ],
            "short",
            12,
            y + 24,
        ),
    ]
    for i, panel in enumerate(panels):
        panel["id"] = i + 1

    def variable(name: str, query: str) -> dict[str, Any]:
        return {
            "name": name,
            "type": "query",
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "query": {"query": query, "refId": name},
            "definition": query,
            "refresh": 2,
        }

    return {
        "title": "kvpilot / LLMService",
        "uid": "kvpilot-llmservice",
        "tags": ["kvpilot", "llm"],
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                variable("namespace", f"label_values({SLO_SERIES}, llmservice_namespace)"),
                variable(
                    "llmservice",
                    f'label_values({SLO_SERIES}{{llmservice_namespace="$namespace"}}, llmservice)',
                ),
            ]
        },
        "panels": panels,
    }


def dashboard_queries() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]


def rendered() -> dict[Path, str]:
    header = (
        "# Generated by `kvpilot observability` from operator/kvpilot_operator/observability.py.\n"
    )
    return {
        RULES_PATH: header + yaml.safe_dump(rules(), sort_keys=False, width=200),
        DASHBOARD_PATH: json.dumps(dashboard(), indent=2) + "\n",
    }


def write(check: bool = False) -> list[Path]:
    """Write the files (or, with check, list the stale ones)."""
    stale = []
    for path, text in rendered().items():
        if not path.is_file() or path.read_text() != text:
            stale.append(path)
            if not check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    return stale
