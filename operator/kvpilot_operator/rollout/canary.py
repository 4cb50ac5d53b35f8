"""The pure step of a canary rollout: judge, step, promote or roll back; and the shadow's health.

`advance_canary` is pure: (spec.rollout.canary, status.canary, this step's analysis, now) -> the
next status.canary and the events to post. `controller.RolloutController` is the loop around it;
the reconcile renders the weights and Deployments that status.canary implies (`plan.py`).
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from kvpilot_operator.api.names import REVISION_LABEL
from kvpilot_operator.api.types import (
    CanaryAnalysis,
    CanarySpec,
    CanaryStatus,
    ShadowStatus,
)
from kvpilot_operator.controller.status import condition

log = logging.getLogger("kvpilot.rollout")

SHADOW_HEALTHY = "ShadowHealthy"
# Too few requests make a p95 meaningless: below this the step is inconclusive and waits.
MIN_CANARY_REQUESTS = 10
# Latency differences under this are noise (histogram bucket interpolation, scheduling jitter):
# a relative regression counts only when it is also this large in absolute terms.
NOISE_FLOOR_S = 0.005
# The shadow is unhealthy when more than this share of mirrored requests fail.
SHADOW_MAX_ERROR_RATIO = 0.05

Event = tuple[str, str, str]  # (Normal|Warning, reason, message)


def parse_time(value: str) -> dt.datetime:
    return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.0f} ms"


def judge(cfg: CanarySpec, a: CanaryAnalysis) -> tuple[str, list[str]]:
    """Pass, Fail or Inconclusive, with the reasons (always the figures compared)."""
    if a.canary_requests < MIN_CANARY_REQUESTS:
        return "Inconclusive", [
            f"{a.canary_requests} canary requests in the step; at least "
            f"{MIN_CANARY_REQUESTS} are needed to judge"
        ]
    failures, figures = [], []
    for what, canary_ms, stable_ms, allowed in (
        ("TTFT", a.canary_ttft_p95_ms, a.stable_ttft_p95_ms, cfg.max_ttft_regression),
        ("TPOT", a.canary_tpot_p95_ms, a.stable_tpot_p95_ms, cfg.max_tpot_regression),
    ):
        if canary_ms is None or stable_ms is None:
            figures.append(f"{what} p95 canary {canary_ms} ms, stable {stable_ms} ms")
            continue
        text = f"{what} p95 canary {canary_ms:.0f} ms vs stable {stable_ms:.0f} ms"
        worse = canary_ms > stable_ms * (1 + allowed) and (
            canary_ms - stable_ms > NOISE_FLOOR_S * 1000
        )
        if worse:
            failures.append(f"{text} (more than +{allowed:.0%})")
        else:
            figures.append(text)
    c_err, s_err = a.canary_error_rate or 0.0, a.stable_error_rate or 0.0
    err_text = f"error rate canary {c_err:.1%} vs stable {s_err:.1%}"
    if c_err - s_err > cfg.max_error_rate_increase:
        failures.append(f"{err_text} (more than +{cfg.max_error_rate_increase:.1%})")
    else:
        figures.append(err_text)
    return ("Fail", failures) if failures else ("Pass", figures)


def with_baseline(a: CanaryAnalysis, previous: CanaryAnalysis | None) -> CanaryAnalysis:
    """At 100% the stable revision gets no traffic: compare with its figures from the last step
    that had them."""
    if previous is None:
        return a
    update = {
        f: getattr(previous, f)
        for f in ("stable_ttft_p95_ms", "stable_tpot_p95_ms", "stable_error_rate")
        if getattr(a, f) is None and getattr(previous, f) is not None
    }
    return a.model_copy(update=update) if update else a


def advance_canary(
    cfg: CanarySpec,
    cs: CanaryStatus,
    analysis: CanaryAnalysis | None,
    now: dt.datetime,
    *,
    stable_rolled_out: bool = False,
    unavailable: str | None = None,
    canary_ready: bool = True,
) -> tuple[CanaryStatus, list[Event]]:
    """The next status.canary. `analysis` is this step's comparison (None when it could not be
    taken, `unavailable` saying why); `stable_rolled_out` whether the stable Deployment already
    runs the canary's revision (ends a promotion); `canary_ready` whether a canary engine is
    available (until one is, the step's clock does not run: its load time is no evidence)."""
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    if cs.phase == "Promoting":
        if not stable_rolled_out:
            return cs, []
        done = cs.model_copy(update={"phase": "Promoted", "step_started_at": stamp})
        return done, [("Normal", "CanaryPromoted", f"revision {cs.revision} is now stable")]
    if cs.phase != "Progressing":
        return cs, []
    if (now - parse_time(cs.step_started_at)).total_seconds() < cfg.step_seconds:
        return cs, []
    if not canary_ready:
        waiting = ["the canary's engines are not ready yet: the step starts when one is"]
        return cs.model_copy(update={"step_started_at": stamp, "reasons": waiting}), []
    if analysis is None:
        verdict, reasons = "Inconclusive", [unavailable or "no analysis"]
    else:
        analysis = with_baseline(analysis, cs.analysis)
        verdict, reasons = judge(cfg, analysis)
    update: dict[str, Any] = {"verdict": verdict, "reasons": reasons, "step_started_at": stamp}
    if analysis is not None:
        update["analysis"] = analysis
    at = f"at {cs.weight}%"
    if verdict == "Inconclusive":
        # Wait another step's time; post the event only when the verdict turns inconclusive.
        events = (
            []
            if cs.verdict == "Inconclusive"
            else [("Warning", "CanaryInconclusive", f"{at}: {'; '.join(reasons)}")]
        )
        return cs.model_copy(update=update), events
    if verdict == "Fail":
        update.update(phase="RolledBack", weight=0)
        message = f"revision {cs.revision} rolled back {at}: {'; '.join(reasons)}"
        return cs.model_copy(update=update), [("Warning", "CanaryRolledBack", message)]
    if cs.step + 1 < len(cfg.steps):
        weight = cfg.steps[cs.step + 1]
        update.update(step=cs.step + 1, weight=weight)
        message = f"analysis passed {at} ({'; '.join(reasons)}); canary now gets {weight}%"
        return cs.model_copy(update=update), [("Normal", "CanaryStep", message)]
    update.update(phase="Promoting", weight=100)
    message = f"analysis passed {at} ({'; '.join(reasons)}); promoting revision {cs.revision}"
    return cs.model_copy(update=update), [("Normal", "CanaryPromoting", message)]


def stable_runs(deployment: dict[str, Any] | None, revision: str) -> bool:
    """Whether the stable Deployment has finished rolling out `revision`."""
    if deployment is None:
        return False
    spec, st = deployment.get("spec") or {}, deployment.get("status") or {}
    labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
    want = spec.get("replicas", 1)
    return (
        labels.get(REVISION_LABEL) == revision
        and (st.get("observedGeneration") or 0) >= (deployment["metadata"].get("generation") or 0)
        and (st.get("updatedReplicas") or 0) >= want
        and (st.get("availableReplicas") or 0) >= want
        and (st.get("replicas") or 0) <= want
    )


def shadow_condition(summary: ShadowStatus | None, error: str | None) -> dict[str, Any]:
    if summary is None:
        return condition(SHADOW_HEALTHY, ("Unknown", "NoMetrics", error or "no shadow metrics"))
    if summary.mirrored == 0:
        return condition(
            SHADOW_HEALTHY, ("Unknown", "NoMirroredTraffic", "no request was mirrored recently")
        )
    ratio = summary.errors / summary.mirrored
    if ratio > SHADOW_MAX_ERROR_RATIO:
        message = f"{summary.errors} of {summary.mirrored} mirrored requests failed"
        return condition(SHADOW_HEALTHY, ("False", "ShadowErrors", message))
    agreement = (
        ""
        if summary.greedy_agreement is None
        else f"; greedy agreement {summary.greedy_agreement:.1%}"
    )
    served = summary.mirrored - summary.errors
    message = f"{served}/{summary.mirrored} mirrored requests served{agreement}"
    return condition(SHADOW_HEALTHY, ("True", "ShadowServing", message))


