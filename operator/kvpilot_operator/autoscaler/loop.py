"""The autoscaler's evaluation of an LLMService: observe (Prometheus), decide (`decision.decide`),
write. The operator runs it for every LLMService each interval in one loop
(`controller.sweep`, started by the handlers), with each service's state kept here.

The one writer of replicas: a change goes through the LLMService's scale subresource
(`spec.replicas`), and the operator's reconcile carries it to the Deployment, exactly as
`kubectl scale llmservice` would. Advisory mode records the decision and writes nothing else.
Status gets the conditions ScalingActive / AbleToScale / SLOMet, the measured p95s, sloMet and
the last decisions; every change is an event; `kvpilot_autoscaler_*` metrics on the operator's
metrics port.

status.batches (services with spec.batch) is written here too, from the routers' `kvpilot_batch_*`
series in the same Prometheus: the evaluation already asks it about the service each interval,
so the summary costs eight more queries and a status write only when a figure moved, and the
operator never calls into the routers themselves (which would be a request to every router of
every service each interval, with the service's API key, reading every batch record).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Gauge

from kvpilot_operator.api.names import engine_name
from kvpilot_operator.api.policies import Unresolved, resolve
from kvpilot_operator.autoscaler.deadline import batches_status, with_deadline
from kvpilot_operator.autoscaler.decision import (
    Decision,
    ScalerState,
    ScalingParams,
    decide,
    slo_condition,
)
from kvpilot_operator.controller.kube import Kube
from kvpilot_operator.controller.manifests import desired_replicas
from kvpilot_operator.controller.status import condition, merge_conditions, now_iso, strip_times
from kvpilot_operator.observability.prometheus import PrometheusSource, SLOFigures

log = logging.getLogger("kvpilot.autoscaler")

SCALING_ACTIVE, ABLE_TO_SCALE, SLO_MET = "ScalingActive", "AbleToScale", "SLOMet"
MAX_DECISIONS = 10  # kept in status.lastDecisions

_LABELS = ["namespace", "llmservice"]
DESIRED = Gauge("kvpilot_autoscaler_desired_replicas", "Replicas the autoscaler wants.", _LABELS)
CURRENT = Gauge("kvpilot_autoscaler_current_replicas", "spec.replicas in force.", _LABELS)
READY = Gauge("kvpilot_autoscaler_ready_replicas", "Engine replicas ready.", _LABELS)
CAPACITY = Gauge(
    "kvpilot_autoscaler_capacity_tokens_per_second",
    "Estimated tokens/s one replica sustains at the TPOT target.",
    _LABELS,
)
REQUIRED = Gauge(
    "kvpilot_autoscaler_required_replicas", "Replicas the capacity model asks for.", _LABELS
)
SLO_RATIO = Gauge(
    "kvpilot_autoscaler_slo_ratio",
    "Measured latency percentile over its target (short window).",
    [*_LABELS, "slo"],
)
DECISIONS = Counter(
    "kvpilot_autoscaler_decisions",
    "Scaling decisions, by direction and whether they were applied.",
    [*_LABELS, "direction", "applied"],
)
HOLDS = Counter(
    "kvpilot_autoscaler_holds",
    "Evaluations that held the replicas for lack of data, by reason.",
    [*_LABELS, "reason"],
)


@dataclass
class ServiceLoop:
    """What one service's evaluations carry from one to the next (kept from its first evaluation
    until it leaves the operator's index)."""

    state: ScalerState = field(default_factory=ScalerState)
    last_reason: str = ""
    last_advice: int | None = None  # advisory mode: the recommendation already recorded


Emit = Callable[[str, str, str], None]  # (type, reason, message) -> a Kubernetes event


@dataclass
class Autoscaler:
    kube: Kube
    source: PrometheusSource
    interval: float = 15.0
    lock: Callable[[str, str], Any] = field(default=lambda ns, name: threading.Lock())
    clock: Callable[[], float] = time.monotonic
    # Per service, by (namespace, name): written only by that service's evaluation, which never
    # runs twice at once.
    loops: dict[tuple[str, str], ServiceLoop] = field(default_factory=dict)
    # Reads of what the operator's watches already hold (kopf indexes), so that an evaluation at
    # rest asks the API server nothing; None: ask it.
    policies: Callable[[str], dict[str, Any] | None] | None = None
    engines: Callable[[str, str], dict[str, Any] | None] | None = None

    def tick(
        self, namespace: str, name: str, emit: Emit, body: dict[str, Any] | None = None
    ) -> Decision | None:
        """One evaluation of the service, carrying on from its earlier ones. `body`: the
        LLMService as last seen by a watch (else read)."""
        loop = self.loops.setdefault((namespace, name), ServiceLoop())
        return self.evaluate(namespace, name, loop, emit, body)

    def forget(self, namespace: str, name: str) -> None:
        """The service is gone (or no longer watched): its state and its series go too."""
        self.loops.pop((namespace, name), None)
        forget_metrics(namespace, name)

    def evaluate(
        self,
        namespace: str,
        name: str,
        loop: ServiceLoop,
        emit: Emit,
        body: dict[str, Any] | None = None,
    ) -> Decision | None:
        if body is None:
            body = self.kube.get_llmservice(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        resolved = self._resolve(body)
        if resolved is None:
            return None  # the reconcile reports the invalid spec (Degraded)
        spec, params = resolved
        replicas = desired_replicas(spec)
        if self.engines is not None:
            deployment = self.engines(namespace, name)
        else:
            deployment = self.kube.get("apps/v1", "Deployment", engine_name(name), namespace)
        ready = ((deployment or {}).get("status") or {}).get("readyReplicas") or 0
        window = _duration_seconds((spec.slo.window if spec.slo else None) or "5m")
        obs, slo = self.source.observe(
            namespace,
            name,
            params,
            now=self.clock(),
            replicas=replicas,
            ready=min(ready, replicas),
            slo_window=window,
        )
        decision, loop.state = decide(params, loop.state, obs)
        batching = spec.batch is not None and spec.batch.enabled
        batches: dict[str, Any] | None = None  # None: leave status.batches as it is
        figures = self.source.batch_figures(namespace, name) if batching else None
        if figures is not None:
            now = time.time()  # the routers' deadlines are wall-clock times
            batches = batches_status(figures, now)
            if obs.missing is None:
                backlog = figures.backlog_at(now)
                decision = with_deadline(
                    decision, backlog, obs.ready, params.max_replicas, params.target_utilization
                )
        elif not batching:
            batches = {}  # none: status.batches goes
        if slo.window is not None and obs.missing is None:
            # SLOMet is judged over the SLO's own window, not the autoscaler's.
            decision = dataclasses.replace(decision, slo_met=slo_condition(params, slo.window))
        applied = False
        able = decision.able_to_scale
        if decision.changed and not params.advisory:
            try:
                self.kube.scale_llmservice(namespace, name, decision.desired)
                applied = True
            except Exception as err:  # reported in status, retried next time
                msg = f"writing the scale subresource failed: {err}"
                able = ("False", "FailedUpdateScale", msg)
                emit("Warning", "FailedUpdateScale", msg)
        self._record(
            namespace, name, decision, obs.ready, obs.missing, slo, applied, able, loop, emit, body,
            batches,
        )  # fmt: skip
        return decision

    def _resolve(self, body: dict[str, Any]) -> tuple[Any, ScalingParams] | None:
        try:
            _, spec = resolve(body, self.policies or self.kube.get_policy)
        except Unresolved:
            return None  # the reconcile reports why
        return spec, ScalingParams.from_spec(spec)

    def _record(
        self,
        namespace: str,
        name: str,
        d: Decision,
        ready: int,
        missing: tuple[str, str] | None,
        slo: SLOFigures,
        applied: bool,
        able: tuple[str, str, str],
        loop: ServiceLoop,
        emit: Emit,
        seen: dict[str, Any],
        batches: dict[str, Any] | None = None,
    ) -> None:
        labels = (namespace, name)
        DESIRED.labels(*labels).set(d.desired)
        CURRENT.labels(*labels).set(d.current)
        READY.labels(*labels).set(ready)
        for slo_name in ("ttft", "tpot"):
            ratio = d.details.get(f"{slo_name}_ratio")
            if ratio is not None:
                SLO_RATIO.labels(*labels, slo_name).set(ratio)
        if d.capacity is not None:
            CAPACITY.labels(*labels).set(d.capacity)
        if d.required is not None:
            REQUIRED.labels(*labels).set(d.required)
        if missing is not None:
            HOLDS.labels(*labels, missing[0]).inc()
        # Advisory mode recommends the same change every interval; record it once.
        record = d.changed and (applied or d.desired != loop.last_advice)
        if d.changed and not applied:
            loop.last_advice = d.desired
        elif able[1] == "ReadyForNewScale":  # steady, not merely cooling down: a fresh start
            loop.last_advice = None
        if record:
            direction = "up" if d.desired > d.current else "down"
            DECISIONS.labels(*labels, direction, str(applied).lower()).inc()
            verb = "Scaled" if applied else "ScaleRecommended"
            emit(
                "Normal",
                f"{verb}{direction.capitalize()}" if applied else verb,
                f"{d.current} -> {d.desired} replicas: {d.reason}"
                + ("" if applied else " (advisory mode: not applied)"),
            )
        elif missing is not None and loop.last_reason != missing[0]:
            emit("Warning", missing[0], f"holding {d.current} replicas: {missing[1]}")
        loop.last_reason = missing[0] if missing else ""

        if not self._status_patch(seen, d, able, slo, record, applied, batches):
            return  # as last seen, nothing would change: no read, no write
        with self.lock(namespace, name):
            # Conditions are patched as one list: build it on the live status, not the cache's.
            live = self.kube.get_llmservice(namespace, name)
            if live is None:
                return
            patch = self._status_patch(live, d, able, slo, record, applied, batches)
            if patch:
                self.kube.patch_llmservice_status(namespace, name, patch)

    @staticmethod
    def _status_patch(
        body: dict[str, Any],
        d: Decision,
        able: tuple[str, str, str],
        slo: SLOFigures,
        record: bool,
        applied: bool,
        batches: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """What of the autoscaler's status differs from `body`'s (empty: nothing to write).
        `batches`: status.batches as it should be ({}: none; None: as it is)."""
        status = body.get("status") or {}
        patch: dict[str, Any] = {}
        conds = [
            condition(SCALING_ACTIVE, d.scaling_active),
            condition(ABLE_TO_SCALE, able),
            condition(SLO_MET, d.slo_met),
        ]
        merged = merge_conditions(status.get("conditions"), conds, now_iso())
        if strip_times(merged) != strip_times(status.get("conditions") or []):
            patch["conditions"] = merged
        figures = {
            "ttftP95Ms": _ms(slo.ttft_p95),
            "tpotP95Ms": _ms(slo.tpot_p95),
            "sloMet": d.slo_met[0],
        }
        patch.update({k: v for k, v in figures.items() if status.get(k) != v})
        if record:
            entry = {
                "time": now_iso(),
                "from": d.current,
                "to": d.desired,
                "reason": d.reason,
                "applied": applied,
            }
            patch["lastDecisions"] = [*(status.get("lastDecisions") or []), entry][-MAX_DECISIONS:]
        if batches is not None:
            if not batches:
                if status.get("batches") is not None:
                    patch["batches"] = None  # a merge patch's null deletes
            else:
                update = _merge_patch(status.get("batches"), batches)
                if update is not None:
                    patch["batches"] = update
        return patch


def _merge_patch(old: Any, new: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON merge patch that turns `old` (an object as stored: no nulls) into `new` (whose
    None values and empty maps mean absent), or None when they are the same already."""

    def pruned(d: dict[str, Any]) -> dict[str, Any]:
        kept = {k: pruned(v) if isinstance(v, dict) else v for k, v in d.items()}
        return {k: v for k, v in kept.items() if v is not None and v != {}}

    target = pruned(new)
    old = old if isinstance(old, dict) else {}
    if old == target:
        return None
    patch: dict[str, Any] = dict(target)
    for key, value in old.items():
        if key not in target:
            patch[key] = None
        elif isinstance(value, dict) and isinstance(target[key], dict):
            patch[key] = {**target[key], **{k: None for k in value if k not in target[key]}}
    return patch


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _duration_seconds(text: str) -> float:
    """An `slo.window` (the schema allows `^[0-9]+(s|m|h)$`)."""
    return float(text[:-1]) * {"s": 1, "m": 60, "h": 3600}[text[-1]]


def forget_metrics(namespace: str, name: str) -> None:
    for gauge in (DESIRED, CURRENT, READY, CAPACITY, REQUIRED):
        with contextlib.suppress(KeyError):
            gauge.remove(namespace, name)
    for slo_name in ("ttft", "tpot"):
        with contextlib.suppress(KeyError):
            SLO_RATIO.remove(namespace, name, slo_name)
