"""Each LLMService's SLO as Prometheus series on the operator's metrics port, so that one set of
recording rules and burn-rate alerts (the chart's `files/rules/kvpilot.rules.yaml`) serves every
service, whatever its targets.

An SLO "p95 TTFT under 500 ms" is, as an SLI, "95% of requests have TTFT <= 500 ms". The good
events are the engine histogram's bucket at 500 ms, so the operator publishes that bucket's `le`
and the objective; the rules join the engines' buckets on it. The engines' bucket edges include
the usual targets; a target between edges is measured at the edge just below it (stricter, never
looser), and the series says which edge that is.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Any

from kvpilot_engine.contracts import ITL_BUCKETS, TTFT_BUCKETS
from prometheus_client import Gauge
from prometheus_client.utils import floatToGoString

from kvpilot_operator.api.types import LLMServiceSpec

# Not `namespace`/`llmservice`: a scrape job's own `namespace` target label would clash; the
# rules rename these to the engines' labels (namespace, kvpilot_io_llmservice).
_LABELS = ["llmservice_namespace", "llmservice"]
THRESHOLD = Gauge(
    "kvpilot_llmservice_slo_threshold",
    "1 at the engine histogram bucket edge (le, seconds) an LLMService's latency SLO counts as "
    "good; slo is ttft (vllm:time_to_first_token_seconds) or tpot "
    "(vllm:inter_token_latency_seconds).",
    [*_LABELS, "slo", "le"],
)
OBJECTIVE = Gauge(
    "kvpilot_llmservice_slo_objective",
    "Share of requests (ttft) or output tokens (tpot) that must be under the threshold, e.g. "
    "0.95 for a p95 target.",
    [*_LABELS, "slo"],
)
TARGET = Gauge(
    "kvpilot_llmservice_slo_target_seconds",
    "The latency target as the LLMService states it (dashboards draw it as the SLO line).",
    [*_LABELS, "slo", "percentile"],
)

_BUCKETS = {"ttft": TTFT_BUCKETS, "tpot": ITL_BUCKETS}
# Per service: the points published, and the series they made (to withdraw them).
_exported: dict[tuple[str, str], tuple[list[Any], list[tuple[Gauge, tuple[str, ...]]]]] = {}


def bucket_edge(slo: str, target_s: float) -> float:
    """The largest bucket edge at or below the target (the smallest edge if none is)."""
    edges = _BUCKETS[slo]
    i = bisect_right(edges, target_s + 1e-12)
    return edges[max(0, i - 1)]


def slo_points(spec: LLMServiceSpec) -> list[tuple[str, str, float, float, int]]:
    """(slo, le, objective, target seconds, percentile) for each latency target of a resolved
    spec."""
    out = []
    for slo in ("ttft", "tpot"):
        target = getattr(spec.slo, slo) if spec.slo else None
        if target is None:
            continue
        seconds = target.target_ms / 1000
        edge = floatToGoString(bucket_edge(slo, seconds))
        out.append((slo, edge, target.percentile / 100, seconds, target.percentile))
    return out


def export(namespace: str, name: str, spec: LLMServiceSpec | None) -> None:
    """Publish (or, for None, withdraw) one service's SLO series. Called on every reconcile:
    unchanged points change nothing."""
    points = slo_points(spec) if spec is not None else []
    if (namespace, name) in _exported and _exported[(namespace, name)][0] == points:
        return
    forget(namespace, name)
    if not points:
        return
    series: list[tuple[Gauge, tuple[str, ...]]] = []
    for slo, le, objective, seconds, percentile in points:
        for gauge, labels, value in (
            (THRESHOLD, (namespace, name, slo, le), 1.0),
            (OBJECTIVE, (namespace, name, slo), objective),
            (TARGET, (namespace, name, slo, str(percentile)), seconds),
        ):
            gauge.labels(*labels).set(value)
            series.append((gauge, labels))
    _exported[(namespace, name)] = (points, series)


def forget(namespace: str, name: str) -> None:
    for gauge, labels in _exported.pop((namespace, name), ([], []))[1]:
        gauge.remove(*labels)
