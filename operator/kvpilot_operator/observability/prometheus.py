"""What Prometheus says about one LLMService's engines, as the decision function's `Observation`.

Every query selects the service's series with a label selector (by default the labels a standard
`kubernetes-pods` scrape job derives from the pod: `namespace` and the pod label
`kvpilot.io/llmservice` as `kvpilot_io_llmservice`). Errors are not raised: an unreachable
Prometheus, a failing query or a service without scrape targets comes back as
`Observation.missing`, on which the decision holds. TLS and authentication: `connection`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import requests
from prometheus_api_client import PrometheusApiClientException, PrometheusConnect

from kvpilot_operator.api.names import ENGINE_SERIES, PROMETHEUS_SELECTOR, ROUTER_SERIES
from kvpilot_operator.api.types import CanaryAnalysis, ShadowStatus
from kvpilot_operator.autoscaler.deadline import BatchFigures
from kvpilot_operator.autoscaler.decision import Observation, ScalingParams, Window
from kvpilot_operator.observability.connection import PrometheusAccess

DEFAULT_SELECTOR = PROMETHEUS_SELECTOR
# Fewer seconds of batch work than this in the last five minutes: no finish rate yet.
MIN_BUSY_S = 10.0
# The router's queue (scaled to zero, requests wait there for a replica to wake).
ROUTER_WAITING = "kvpilot_router_waiting_requests"


@dataclass(frozen=True)
class SLOFigures:
    """Over the SLO's own window, for status: p95s and the SLO's percentiles."""

    ttft_p95: float | None = None
    tpot_p95: float | None = None
    window: Window | None = None  # ttft/tpot at the SLO percentiles


def _seconds(s: float) -> str:
    return f"{max(1, round(s))}s"


def _quantile(metric: str, q: float, sel: str, window: str) -> str:
    return f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{sel}}}[{window}])))"


class PrometheusSource:
    def __init__(
        self,
        url: str,
        selector: str = DEFAULT_SELECTOR,
        timeout: float = 5.0,
        access: PrometheusAccess | None = None,
    ):
        self.url = url
        self.selector = selector
        access = access or PrometheusAccess()
        self.prom = PrometheusConnect(
            url=url,
            headers=dict(access.headers) or None,
            auth=access.auth(),
            session=access.session(),
            timeout=timeout,
        )

    def _value(self, query: str) -> float | None:
        """The single value of an instant query; None when it has no result or is NaN."""
        result: list[dict[str, Any]] = self.prom.custom_query(query)
        if not result:
            return None
        value = float(result[0]["value"][1])
        return None if math.isnan(value) or math.isinf(value) else value

    def window(self, sel: str, seconds: float, ttft_q: float, tpot_q: float) -> Window:
        w = _seconds(seconds)

        def rate(metric: str) -> str:
            return f"sum(rate({metric}{{{sel}}}[{w}]))"

        tokens = f"({rate('vllm:prompt_tokens_total')} + {rate('vllm:generation_tokens_total')})"
        steps = rate("kvpilot_engine_step_seconds_count")
        # Speculative decoding: drafts verified are step tokens too (`or vector(0)`: engines
        # without the counters count none).
        drafted = f"({rate('vllm:spec_decode_num_draft_tokens_total')} or vector(0))"
        accepted = f"({rate('vllm:spec_decode_num_accepted_tokens_total')} or vector(0))"
        step_tokens = (
            f"({rate('kvpilot_engine_step_prefill_tokens_sum')} + "
            f"{rate('kvpilot_engine_step_decode_tokens_sum')} + {drafted})"
        )
        v = self._value
        return Window(
            request_rate=v(rate("kvpilot_engine_requests_received_total")) or 0.0,
            token_rate=v(tokens) or 0.0,
            tokens_per_request=v(f"{tokens} / {rate('vllm:request_success_total')}"),
            waiting=v(f"sum(vllm:num_requests_waiting{{{sel}}})") or 0.0,
            running=v(f"sum(vllm:num_requests_running{{{sel}}})") or 0.0,
            ttft=v(_quantile("vllm:time_to_first_token_seconds", ttft_q, sel, w)),
            tpot=v(_quantile("vllm:inter_token_latency_seconds", tpot_q, sel, w)),
            step_time=v(f"{rate('kvpilot_engine_step_seconds_sum')} / {steps}"),
            step_tokens=v(f"{step_tokens} / {steps}"),
            kv_usage=v(f"avg(vllm:kv_cache_usage_perc{{{sel}}})"),
            draft_rate=v(drafted) or 0.0,
            accepted_rate=v(accepted) or 0.0,
        )

    def observe(
        self,
        namespace: str,
        name: str,
        params: ScalingParams,
        *,
        now: float,
        replicas: int,
        ready: int,
        slo_window: float,
    ) -> tuple[Observation, SLOFigures]:
        service_sel = self.selector.format(namespace=namespace, name=name)
        sel = f"{service_sel},{ENGINE_SERIES}"
        obs = Observation(time=now, replicas=replicas, ready=ready)
        ttft_q, tpot_q = params.ttft_percentile / 100, params.tpot_percentile / 100
        try:
            targets = self._value(f"count(up{{{sel}}} == 1)") or 0
            if replicas == 0:
                # No engines to scrape: only the router's queue can wake the service.
                queued = self._value(f"sum({ROUTER_WAITING}{{{service_sel}}})") or 0.0
                return replace(obs, short=Window(request_rate=0.0, waiting=queued)), SLOFigures()
            if targets == 0:
                return replace(
                    obs,
                    missing=("NoMetrics", f"Prometheus has no engine targets up for {{{sel}}}"),
                ), SLOFigures()
            short = self.window(sel, params.panic_window, ttft_q, tpot_q)
            long = self.window(sel, params.stable_window, ttft_q, tpot_q)
            if short.tokens_per_request is None and long.tokens_per_request is not None:
                # Long requests may not finish inside the short window; their size has not changed.
                short = replace(short, tokens_per_request=long.tokens_per_request)
            slo = self._slo(sel, slo_window, ttft_q, tpot_q)
        except requests.exceptions.RequestException as err:
            return replace(
                obs, missing=("PrometheusUnreachable", f"{self.url}: {_brief(err)}")
            ), SLOFigures()
        except PrometheusApiClientException as err:
            return replace(obs, missing=("PrometheusError", _brief(err))), SLOFigures()
        return replace(obs, short=short, long=long), slo

    def batch_figures(self, namespace: str, name: str) -> BatchFigures | None:
        """The Batch API's figures from the service's routers, in eight queries whatever the
        number of batches or routers; None without Prometheus (the deadline then asks for
        nothing, the SLO decision stands and status.batches stays as it was). The batch
        directory is shared by the routers, so what they read from it is the same on each (max);
        what each one works on adds up (sum)."""
        sel = f"{self.selector.format(namespace=namespace, name=name)},{ROUTER_SERIES}"
        v = self._value
        try:
            by_status = self._by_label(
                f"max by (status) (kvpilot_batch_batches{{{sel}}})", "status"
            )
            counts = self._by_label(
                f"max by (state) (kvpilot_batch_active_requests{{{sel}}})", "state"
            )
            return BatchFigures(
                by_status={k: int(n) for k, n in by_status.items()},
                total=int(counts.get("total", 0)),
                completed=int(counts.get("completed", 0)),
                failed=int(counts.get("failed", 0)),
                backlog=v(f"sum(kvpilot_batch_requests{{{sel}}})") or 0.0,
                deadline_at=v(f"min(kvpilot_batch_deadline_timestamp_seconds{{{sel}}} > 0)"),
                **self._finish_rate(namespace, name, sel),
            )
        except (requests.exceptions.RequestException, PrometheusApiClientException):
            return None

    def _finish_rate(self, namespace: str, name: str, sel: str) -> dict[str, float | None]:
        """Batch requests answered per second of the last five minutes in which the routers had
        batch work, the engine replicas up meanwhile (`deadline` says why not a plain rate) and
        the tokens of an answered request. Seconds with work are counted on a 1 s grid (a 5 s
        grid counted up to 5 s too many early in a batch, when it matters most: a rate a third
        too low); fewer than MIN_BUSY_S of them is no measurement yet."""
        engines = f"{self.selector.format(namespace=namespace, name=name)},{ENGINE_SERIES}"
        busy = f"(sum(kvpilot_batch_requests{{{sel}}}) > 0)"
        v = self._value
        seconds = v(f"count_over_time({busy}[5m:1s])")
        if not seconds or seconds < MIN_BUSY_S:
            return {"finish_rate": None, "replicas": None, "tokens_per_request": None}
        answered = v(f"sum(increase(kvpilot_batch_requests_finished_total{{{sel}}}[5m]))")
        tokens = v(f"sum(increase(kvpilot_batch_tokens_total{{{sel}}}[5m]))")
        replicas = v(f"avg_over_time((count(up{{{engines}}} == 1) and on() {busy})[5m:5s])")
        rate = None if answered is None else answered / min(seconds, 300.0)
        per_request = tokens / answered if answered and tokens else None
        return {"finish_rate": rate, "replicas": replicas, "tokens_per_request": per_request}

    def _slo(self, sel: str, seconds: float, ttft_q: float, tpot_q: float) -> SLOFigures:
        w = _seconds(seconds)

        def quantile(metric: str, q: float) -> float | None:
            return self._value(_quantile(metric, q, sel, w))

        ttft, tpot = "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds"
        ttft95, tpot95 = quantile(ttft, 0.95), quantile(tpot, 0.95)
        at_slo = Window(
            request_rate=0.0,
            ttft=ttft95 if ttft_q == 0.95 else quantile(ttft, ttft_q),
            tpot=tpot95 if tpot_q == 0.95 else quantile(tpot, tpot_q),
        )
        return SLOFigures(ttft_p95=ttft95, tpot_p95=tpot95, window=at_slo)

    # ---- rollouts: the routers' client-side figures, by revision ------------------------------

    def _by_label(self, query: str, label: str = "revision") -> dict[str, float]:
        """A vector query's finite values keyed by one label (a revision, a batch status...)."""
        out = {}
        for sample in self.prom.custom_query(query):
            value = float(sample["value"][1])
            if not (math.isnan(value) or math.isinf(value)):
                out[sample["metric"].get(label, "")] = value
        return out

    def canary_analysis(
        self, namespace: str, name: str, stable: str, canary: str, seconds: float
    ) -> tuple[CanaryAnalysis | None, str | None]:
        """Canary against stable over the last `seconds`, from `kvpilot_router_*`; or None and
        why it could not be taken."""
        sel = (
            f"{self.selector.format(namespace=namespace, name=name)},{ROUTER_SERIES},"
            f'revision=~"{stable}|{canary}"'
        )
        return self._compare(sel, "revision", "kvpilot_router", stable, canary, seconds)

    def adapter_canary_analysis(
        self, namespace: str, name: str, adapter: str, seconds: float
    ) -> tuple[CanaryAnalysis | None, str | None]:
        """An adapter's canary version against its stable one (the same engines, the routers'
        `kvpilot_router_adapter_*` series by variant) over the last `seconds`."""
        sel = (
            f"{self.selector.format(namespace=namespace, name=name)},{ROUTER_SERIES},"
            f'adapter="{adapter}"'
        )
        return self._compare(sel, "variant", "kvpilot_router_adapter", "stable", "canary", seconds)

    def _compare(
        self, sel: str, by: str, prefix: str, stable: str, canary: str, seconds: float
    ) -> tuple[CanaryAnalysis | None, str | None]:
        w = _seconds(seconds)
        requests_ = f"{prefix}_requests_total{{{sel}}}"
        errors = f'{prefix}_requests_total{{{sel},code=~"5.."}}'

        def p95(metric: str) -> dict[str, float]:
            return self._by_label(
                f"histogram_quantile(0.95, sum by (le, {by}) "
                f"(rate({metric}_bucket{{{sel}}}[{w}])))",
                by,
            )

        try:
            counts = self._by_label(f"sum by ({by}) (increase({requests_}[{w}]))", by)
            failed = self._by_label(f"sum by ({by}) (increase({errors}[{w}]))", by)
            ttft, tpot = p95(f"{prefix}_ttft_seconds"), p95(f"{prefix}_tpot_seconds")
        except requests.exceptions.RequestException as err:
            return None, f"Prometheus unreachable: {_brief(err)}"
        except PrometheusApiClientException as err:
            return None, f"Prometheus error: {_brief(err)}"

        def ms(values: dict[str, float], rev: str) -> float | None:
            return None if rev not in values else round(values[rev] * 1000, 1)

        def rate(rev: str) -> float | None:
            total = counts.get(rev, 0.0)
            # increase() extrapolates each series on its own: the ratio can pass 1 a little.
            return None if total <= 0 else round(min(1.0, failed.get(rev, 0.0) / total), 4)

        return CanaryAnalysis(
            canary_requests=round(counts.get(canary, 0.0)),
            stable_requests=round(counts.get(stable, 0.0)),
            canary_ttft_p95_ms=ms(ttft, canary),
            stable_ttft_p95_ms=ms(ttft, stable),
            canary_tpot_p95_ms=ms(tpot, canary),
            stable_tpot_p95_ms=ms(tpot, stable),
            canary_error_rate=rate(canary),
            stable_error_rate=rate(stable),
        ), None

    def shadow_summary(
        self, namespace: str, name: str, revision: str, seconds: float
    ) -> tuple[ShadowStatus | None, str | None]:
        """What the routers saw of the shadow over the last `seconds`."""
        w = _seconds(seconds)
        sel = f"{self.selector.format(namespace=namespace, name=name)},{ROUTER_SERIES}"
        rsel = f'{sel},revision="{revision}"'

        def total(metric: str, extra: str = "") -> float:
            return self._value(f"sum(increase({metric}{{{rsel}{extra}}}[{w}]))") or 0.0

        def p50_ms(metric: str) -> float | None:
            q = f"histogram_quantile(0.5, sum by (le) (rate({metric}_bucket{{{sel}}}[{w}])))"
            value = self._value(q)
            return None if value is None else round(value * 1000, 1)

        try:
            mirrored = total("kvpilot_router_shadow_requests_total", ',result=~"ok|error|timeout"')
            errors = total("kvpilot_router_shadow_requests_total", ',result=~"error|timeout"')
            greedy = total("kvpilot_router_shadow_compared_total", ',kind="greedy"')
            sampled = total("kvpilot_router_shadow_compared_total", ',kind="sampled"')
            exact = total("kvpilot_router_shadow_exact_match_total")
            overlap = self._value(
                f"sum(increase(kvpilot_router_shadow_overlap_sum{{{sel}}}[{w}])) / "
                f"sum(increase(kvpilot_router_shadow_overlap_count{{{sel}}}[{w}]))"
            )
            e2e = p50_ms("kvpilot_router_shadow_latency_delta_seconds")
            ttft = p50_ms("kvpilot_router_shadow_ttft_delta_seconds")
        except requests.exceptions.RequestException as err:
            return None, f"Prometheus unreachable: {_brief(err)}"
        except PrometheusApiClientException as err:
            return None, f"Prometheus error: {_brief(err)}"
        return ShadowStatus(
            revision=revision,
            mirrored=round(mirrored),
            errors=round(errors),
            compared=round(greedy + sampled),
            greedy_compared=round(greedy),
            greedy_agreement=None if greedy < 0.5 else round(min(1.0, exact / greedy), 4),
            mean_overlap=None if overlap is None else round(overlap, 4),
            e2e_delta_p50_ms=e2e,
            ttft_delta_p50_ms=ttft,
        ), None


def _brief(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text[:200]
