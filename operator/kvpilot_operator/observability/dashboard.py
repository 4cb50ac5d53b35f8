"""The Grafana dashboard the chart ships: one dashboard per LLMService (namespace and service
variables) with its SLO lines, error budget, replicas, queue, KV cache, throughput, canary by
revision, shadow, Batch API, speculative decoding and per-adapter (LoRA) panels. Generated, so
the panels and the metric names they read cannot drift apart."""

from __future__ import annotations

from typing import Any

from kvpilot_operator.api.names import ENGINE_SERIES as ENGINES
from kvpilot_operator.api.names import ROUTER_SERIES as ROUTERS
from kvpilot_operator.observability.rules import SLIS

SVC = 'namespace="$namespace",kvpilot_io_llmservice="$llmservice"'
OP = 'llmservice_namespace="$namespace",llmservice="$llmservice"'
AUTOSCALER = 'namespace="$namespace",llmservice="$llmservice"'
RI = "$__rate_interval"
SLO_SERIES = "kvpilot_llmservice_slo_objective"
BY_ADAPTER = "le, adapter, variant"


def _q(metric: str, q: float, sel: str, by: str = "le") -> str:
    return f"histogram_quantile({q}, sum by ({by}) (rate({metric}_bucket{{{sel}}}[{RI}])))"


def _spec(counter: str, sel: str) -> str:
    """A vllm:spec_decode_num_* counter's rate over the service's engines."""
    return f"sum(rate(vllm:spec_decode_num_{counter}_total{{{sel}}}[{RI}]))"


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
        _panel(
            "Batch API: requests",
            [
                ("{{state}}", f"sum by (state) (kvpilot_batch_requests{{{routers}}})"),
                (
                    "{{result}}/s",
                    "sum by (result) "
                    f"(rate(kvpilot_batch_requests_finished_total{{{routers}}}[{RI}]))",
                ),
            ],
            "short",
            0,
            y + 32,
        ),
        _panel(
            "Batch API: tokens/s and the nearest deadline",
            [
                (
                    "{{kind}} tokens/s",
                    f"sum by (kind) (rate(kvpilot_batch_tokens_total{{{routers}}}[{RI}]))",
                ),
                ("deadline (s)", f"min(kvpilot_batch_deadline_seconds{{{routers}}} > 0)"),
            ],
            "short",
            12,
            y + 32,
        ),
        _panel(
            "Speculative decoding: acceptance rate and tokens per verify step",
            [
                (
                    "acceptance rate",
                    f"{_spec('accepted_tokens', engines)} / {_spec('draft_tokens', engines)}",
                ),
                (
                    "tokens per verify step",
                    f"1 + {_spec('accepted_tokens', engines)} / {_spec('drafts', engines)}",
                ),
            ],
            "short",
            0,
            y + 40,
        ),
        _panel(
            "LoRA adapters: requests/s and error rate by adapter and variant",
            [
                (
                    "{{adapter}} {{variant}}",
                    "sum by (adapter, variant) "
                    f"(rate(kvpilot_router_adapter_requests_total{{{routers}}}[{RI}]))",
                ),
                (
                    "errors {{adapter}} {{variant}}",
                    "(sum by (adapter, variant) (rate(kvpilot_router_adapter_requests_total"
                    f'{{{routers},code=~"5.."}}[{RI}])) or 0 * sum by (adapter, variant) '
                    f"(rate(kvpilot_router_adapter_requests_total{{{routers}}}[{RI}]))) / sum by "
                    "(adapter, variant) "
                    f"(rate(kvpilot_router_adapter_requests_total{{{routers}}}[{RI}]))",
                ),
            ],
            "short",
            0,
            y + 48,
        ),
        _panel(
            "LoRA adapters: client-side TTFT and TPOT p95 by adapter and variant",
            [
                (
                    "TTFT {{adapter}} {{variant}}",
                    _q("kvpilot_router_adapter_ttft_seconds", 0.95, routers, BY_ADAPTER),
                ),
                (
                    "TPOT {{adapter}} {{variant}}",
                    _q("kvpilot_router_adapter_tpot_seconds", 0.95, routers, BY_ADAPTER),
                ),
            ],
            "s",
            12,
            y + 48,
        ),
        _panel(
            "Speculative decoding: draft tokens verified and accepted",
            [
                ("verified/s", _spec("draft_tokens", engines)),
                ("accepted/s", _spec("accepted_tokens", engines)),
                ("output tokens/s", f"sum(rate(vllm:generation_tokens_total{{{engines}}}[{RI}]))"),
            ],
            "short",
            12,
            y + 40,
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
