"""The Prometheus rules the chart ships (`charts/kvpilot/files/rules/kvpilot.rules.yaml`).

Recording rules for each LLMService's SLIs (share of requests with TTFT, and of tokens with TPOT,
under the SLO's threshold, over 5m..30d) and error-budget burn rates, and multi-window,
multi-burn-rate alerts (the SRE workbook's 14.4x/6x/3x/1x pairs for a 30-day budget), plus a few
symptom alerts. The chart wraps the same groups in a PrometheusRule; plain Prometheus loads the
file. Every rule reads the SLO from the operator's `kvpilot_llmservice_slo_*` series
(`slo_series.py`), so one rule set serves services with different targets.
"""

from __future__ import annotations

from typing import Any

from kvpilot_operator.api.names import ENGINE_SERIES as ENGINES
from kvpilot_operator.api.names import ROUTER_SERIES as ROUTERS

BY = "namespace, kvpilot_io_llmservice"
WHO = "{{ $labels.namespace }}/{{ $labels.kvpilot_io_llmservice }}"  # in alert annotations
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
