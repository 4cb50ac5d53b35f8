"""The rollout evaluation: for a service with spec.rollout, read the routers' metrics from
Prometheus, advance status.canary with `canary.advance_canary`, summarise the shadow, and ask for a
reconcile when the weights change (the reconcile renders what status.canary implies, see
`plan.plan_rollout`). The operator runs it for every such service each interval in one loop
(`controller.sweep`, started by the handlers)."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from kvpilot_operator.api.names import REVISION_LABEL, engine_name
from kvpilot_operator.api.policies import parse
from kvpilot_operator.api.types import CanaryAnalysis, CanarySpec, CanaryStatus, LLMServiceSpec
from kvpilot_operator.controller.kube import Kube
from kvpilot_operator.controller.status import merge_conditions, now_iso, strip_times
from kvpilot_operator.observability.prometheus import PrometheusSource
from kvpilot_operator.rollout.adapters import advance_adapters, evaluated, with_shadows
from kvpilot_operator.rollout.canary import (
    advance_canary,
    parse_time,
    shadow_condition,
    stable_runs,
)

log = logging.getLogger("kvpilot.rollout")

SHADOW_WINDOW_S = 300.0
NO_PROMETHEUS = "no Prometheus: the operator runs without --prometheus-url"
# The shadow summary is nine queries over five minutes: not worth repeating every canary tick.
SHADOW_EVERY_S = 10.0


@dataclass
class RolloutController:
    kube: Kube
    source: PrometheusSource | None
    interval: float
    lock: Callable[[str, str], threading.Lock]
    reconcile: Callable[[dict[str, Any]], Any]

    # When each service's shadow is next summarised, by (namespace, name).
    next_shadow: dict[tuple[str, str], float] = field(default_factory=dict)

    def tick(
        self,
        namespace: str,
        name: str,
        emit: Callable[[str, str, str], None],
        body: dict[str, Any] | None = None,
    ) -> None:
        """One evaluation of the service; its shadow summarised every SHADOW_EVERY_S only.
        `body`: the LLMService as last seen by a watch (else read)."""
        key = (namespace, name)
        shadow = time.monotonic() >= self.next_shadow.get(key, 0.0)
        if shadow:
            self.next_shadow[key] = time.monotonic() + SHADOW_EVERY_S
        self.evaluate(namespace, name, emit, shadow=shadow, body=body)

    def forget(self, namespace: str, name: str) -> None:
        self.next_shadow.pop((namespace, name), None)

    def evaluate(
        self,
        namespace: str,
        name: str,
        emit: Callable[[str, str, str], None],
        *,
        shadow: bool = True,
        body: dict[str, Any] | None = None,
    ) -> None:
        if body is None:
            body = self.kube.get_llmservice(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        try:
            # spec.rollout and spec.adapters are no ServingPolicy fields, so the service's own
            # spec is the resolved one here: parsing spares an API read of the policy per tick.
            spec = parse(body).spec
        except ValidationError:
            return  # the reconcile reports InvalidSpec
        rollout = spec.rollout
        status = body.get("status") or {}
        if rollout is not None and rollout.canary is not None and status.get("canary"):
            self._canary(namespace, name, rollout.canary, status, emit)
        if evaluated(spec, status.get("adapters")):
            self._adapters(namespace, name, spec, status, emit)
        if shadow and any(a.shadow is not None for a in spec.adapters or []):
            self._adapter_shadows(namespace, name, spec)
        if shadow and rollout is not None and rollout.shadow is not None:
            self._shadow(namespace, name)

    def _canary(
        self,
        namespace: str,
        name: str,
        cfg: CanarySpec,
        status: dict[str, Any],
        emit: Callable[[str, str, str], None],
    ) -> None:
        try:
            cs = CanaryStatus.model_validate(status["canary"])
        except ValidationError:
            return
        if cs.phase not in ("Progressing", "Promoting"):
            return
        now = dt.datetime.now(dt.timezone.utc)
        analysis, unavailable, rolled_out, ready = None, None, False, True
        if cs.phase == "Promoting":
            live = self.kube.get("apps/v1", "Deployment", engine_name(name), namespace)
            rolled_out = stable_runs(live, cs.revision)
        elif (now - parse_time(cs.step_started_at)).total_seconds() >= cfg.step_seconds:
            canary = self.kube.get("apps/v1", "Deployment", engine_name(name, "canary"), namespace)
            ready = bool(((canary or {}).get("status") or {}).get("availableReplicas"))
            if ready and self.source is None:
                unavailable = NO_PROMETHEUS
            elif ready and self.source is not None:
                analysis, unavailable = self.source.canary_analysis(
                    namespace, name, cs.stable_revision, cs.revision, cfg.step_seconds
                )
        new, events = advance_canary(
            cfg,
            cs,
            analysis,
            now,
            stable_rolled_out=rolled_out,
            unavailable=unavailable,
            canary_ready=ready,
        )
        if new == cs:
            return
        with self.lock(namespace, name):
            live = self.kube.get_llmservice(namespace, name)
            if live is None or (live.get("status") or {}).get("canary") != status["canary"]:
                return  # a new canary started meanwhile; this evaluation is stale
            patch = new.model_dump(mode="json", by_alias=True, exclude_none=True)
            # Merge patch: fields dropped from the model must be nulled explicitly.
            patch.update({k: None for k in status["canary"] if k not in patch})
            self.kube.patch_llmservice_status(namespace, name, {"canary": patch})
        for kind, reason, message in events:
            emit(kind, reason, message)
        if (new.phase, new.weight) != (cs.phase, cs.weight):
            live = self.kube.get_llmservice(namespace, name)
            if live is not None:
                self.reconcile(live)

    def _adapters(
        self,
        namespace: str,
        name: str,
        spec: LLMServiceSpec,
        status: dict[str, Any],
        emit: Callable[[str, str, str], None],
    ) -> None:
        """Each adapter canary's step: judged on the routers' per-adapter series."""
        now = dt.datetime.now(dt.timezone.utc)
        before = status.get("adapters")
        phases = {e["name"]: e.get("canary") or {} for e in before or []}
        analyses: dict[str, tuple[CanaryAnalysis | None, str | None]] = {}
        for a in spec.adapters or []:
            cs = phases.get(a.name) or {}
            if a.canary is None or cs.get("phase") != "Progressing":
                continue
            if (now - parse_time(cs["stepStartedAt"])).total_seconds() < a.canary.step_seconds:
                continue
            if self.source is None:
                analyses[a.name] = (None, NO_PROMETHEUS)
            else:
                analyses[a.name] = self.source.adapter_canary_analysis(
                    namespace, name, a.served, a.canary.step_seconds
                )
        after, events = advance_adapters(spec, before, analyses, now)
        if after == before:
            return
        with self.lock(namespace, name):
            live = self.kube.get_llmservice(namespace, name)
            if live is None or (live.get("status") or {}).get("adapters") != before:
                return  # moved on meanwhile; this evaluation is stale
            self.kube.patch_llmservice_status(namespace, name, {"adapters": after})
        for kind, reason, message in events:
            emit(kind, reason, message)
        if _shares(after) != _shares(before):
            live = self.kube.get_llmservice(namespace, name)
            if live is not None:
                self.reconcile(live)  # the routes carry the new shares

    def _adapter_shadows(self, namespace: str, name: str, spec: LLMServiceSpec) -> None:
        """status.adapters[].shadow: what the routers saw of each adapter's shadow version."""
        if self.source is None:
            return
        summaries = {}
        for a in spec.adapters or []:
            if a.shadow is not None:
                summary, _ = self.source.shadow_summary(
                    namespace, name, f"{a.served}@shadow", SHADOW_WINDOW_S
                )
                if summary is not None:
                    summaries[a.name] = summary
        with self.lock(namespace, name):
            live = self.kube.get_llmservice(namespace, name)
            if live is None:
                return
            before = (live.get("status") or {}).get("adapters")
            after = with_shadows(spec, before, summaries)
            if after != before:
                self.kube.patch_llmservice_status(namespace, name, {"adapters": after})

    def _shadow(self, namespace: str, name: str) -> None:
        if self.source is None:
            return
        live_shadow = self.kube.get("apps/v1", "Deployment", engine_name(name, "shadow"), namespace)
        template = ((live_shadow or {}).get("spec") or {}).get("template") or {}
        revision = (template.get("metadata") or {}).get("labels", {}).get(REVISION_LABEL)
        if not revision:
            return  # not rendered yet
        summary, error = self.source.shadow_summary(namespace, name, revision, SHADOW_WINDOW_S)
        cond = shadow_condition(summary, error)
        with self.lock(namespace, name):
            live = self.kube.get_llmservice(namespace, name)
            if live is None:
                return
            current = live.get("status") or {}
            merged = merge_conditions(current.get("conditions"), [cond], now_iso())
            patch: dict[str, Any] = {}
            if summary is not None:
                wanted = summary.model_dump(mode="json", by_alias=True, exclude_none=True)
                if current.get("shadow") != wanted:
                    # Merge patch: None removes a figure that has no value any more.
                    patch["shadow"] = summary.model_dump(mode="json", by_alias=True)
            if strip_times(merged) != strip_times(current.get("conditions") or []):
                patch["conditions"] = merged
            if patch:
                self.kube.patch_llmservice_status(namespace, name, patch)


def _shares(entries: list[dict[str, Any]] | None) -> set[tuple[str, Any, Any]]:
    """What of status.adapters the routes carry: each canary's phase and weight."""
    out = set()
    for e in entries or []:
        canary = e.get("canary") or {}
        out.add((e.get("name"), canary.get("phase"), canary.get("weight")))
    return out
