"""What the operator reads from Prometheus and what it ships for it.

- `prometheus`: the queries the autoscaler and the rollout controller run (`PrometheusSource`).
- `connection`: TLS, bearer token (re-read as it rotates) and extra headers for that Prometheus.
- `slo_series`: the `kvpilot_llmservice_slo_*` series the operator exports for each service.
- `rules`, `dashboard`: the chart's recording rules and alerts, and its Grafana dashboard.
- `files`: writes (or checks) the chart's copies of both (`kvpilot observability`).
"""
