"""The router's Prometheus metrics, in a registry of its own.

Latency buckets are the engine's (`kvpilot_engine.contracts`), so the router's client-side
TTFT and the engine's TTFT can be read against the same SLO edges. Shadow traffic has metrics of
its own and never touches the user-facing ones: the autoscaler scales the primary on those.
"""

from __future__ import annotations

from collections.abc import Callable

from kvpilot_engine.contracts import ITL_BUCKETS, REQUEST_LATENCY_BUCKETS, TTFT_BUCKETS
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

OVERLAP_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
_DELTA_EDGES = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DELTA_BUCKETS = (*(-x for x in reversed(_DELTA_EDGES)), 0.0, *_DELTA_EDGES)


class RouterMetrics:
    def __init__(self, waiting: Callable[[], float]):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "kvpilot_router_requests_total",
            "Requests answered, by serving revision and HTTP status sent to the client.",
            ["revision", "code"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "kvpilot_router_upstream_errors_total",
            "Failed upstream attempts: connect, timeout, status_5xx, stream_broken.",
            ["revision", "kind"],
            registry=r,
        )
        self.retries = Counter(
            "kvpilot_router_retries_total",
            "Requests sent again to another endpoint after a failed attempt.",
            ["revision"],
            registry=r,
        )
        self.ttft = Histogram(
            "kvpilot_router_ttft_seconds",
            "Client-side time to first token: receipt to the first forwarded text event.",
            ["revision"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "kvpilot_router_tpot_seconds",
            "Mean time between forwarded text events of one stream.",
            ["revision"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "kvpilot_router_e2e_seconds",
            "Receipt to the last byte forwarded.",
            ["revision"],
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "kvpilot_router_in_flight_requests",
            "Requests being proxied now.",
            ["revision"],
            registry=r,
        )
        # The autoscaler wakes a service scaled to zero from this one: keep its name.
        self.waiting = Gauge(
            "kvpilot_router_waiting_requests",
            "Requests queued in the router for a free slot or for an endpoint to appear.",
            registry=r,
        )
        self.waiting.set_function(waiting)
        self.rejected = Counter(
            "kvpilot_router_rejected_total",
            "Requests refused: queue_full, queue_timeout, unauthorized, bad_request, too_large.",
            ["reason"],
            registry=r,
        )
        self.endpoints = Gauge(
            "kvpilot_router_endpoints",
            "Ready endpoints known, by revision (shadow included).",
            ["revision"],
            registry=r,
        )
        self.shadow_requests = Counter(
            "kvpilot_router_shadow_requests_total",
            "Mirrored requests: ok, error, timeout, dropped_rate, dropped_busy.",
            ["revision", "result"],
            registry=r,
        )
        self.shadow_compared = Counter(
            "kvpilot_router_shadow_compared_total",
            "Shadow answers compared with the primary's, greedy or sampled.",
            ["revision", "kind"],
            registry=r,
        )
        self.shadow_exact = Counter(
            "kvpilot_router_shadow_exact_match_total",
            "Greedy requests whose shadow output equalled the primary's.",
            ["revision"],
            registry=r,
        )
        self.shadow_overlap = Histogram(
            "kvpilot_router_shadow_overlap",
            "Token overlap F1 of shadow and primary outputs, per compared request.",
            buckets=OVERLAP_BUCKETS,
            registry=r,
        )
        self.shadow_latency_delta = Histogram(
            "kvpilot_router_shadow_latency_delta_seconds",
            "Shadow end-to-end latency minus the primary's, per compared request.",
            buckets=DELTA_BUCKETS,
            registry=r,
        )
        self.shadow_ttft_delta = Histogram(
            "kvpilot_router_shadow_ttft_delta_seconds",
            "Shadow time to first token minus the primary's, per compared stream.",
            buckets=DELTA_BUCKETS,
            registry=r,
        )

        # LoRA adapters: by the adapter clients named and its version (stable, canary): what
        # an adapter's canary is judged on, as a model canary is on the revision series above.
        self.adapter_requests = Counter(
            "kvpilot_router_adapter_requests_total",
            "Requests for a LoRA adapter answered, by adapter, variant and HTTP status.",
            ["adapter", "variant", "code"],
            registry=r,
        )
        self.adapter_ttft = Histogram(
            "kvpilot_router_adapter_ttft_seconds",
            "Client-side time to first token of an adapter's streams, by adapter and variant.",
            ["adapter", "variant"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.adapter_tpot = Histogram(
            "kvpilot_router_adapter_tpot_seconds",
            "Mean time between forwarded text events of an adapter's streams.",
            ["adapter", "variant"],
            buckets=ITL_BUCKETS,
            registry=r,
        )

    def set_endpoints(self, counts: dict[str, int]) -> None:
        self.endpoints.clear()  # revisions that are gone should not linger
        for revision, n in counts.items():
            self.endpoints.labels(revision).set(n)
