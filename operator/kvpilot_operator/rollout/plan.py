"""Which revisions serve an LLMService now: the stable one, and a canary with its weight.

Pure: (the resolved spec, the live stable Deployment, status.canary) -> a `Plan` for the renderer.
The reconcile calls it; the rollout controller moves status.canary on, which changes the plan.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from kvpilot_operator.api.types import CanaryStatus, LLMService, LLMServiceSpec
from kvpilot_operator.controller.manifests import Plan, revision_of, spec_from_annotation

# Fields of a resolved spec that say how a service scales and rolls out, not what its engines
# run: the stable revision takes them from the current spec. Adapters too: they roll the engines
# in place (their own canaries are by request share on the same engines), not as a model canary.
_POLICY_FIELDS = ("replicas", "scaling", "slo", "rollout", "router", "adapters")


def plan_rollout(
    svc: LLMService,
    spec: LLMServiceSpec,
    stable_live: dict[str, Any] | None,
    canary_status: dict[str, Any] | None,
    now: str,
) -> tuple[Plan, dict[str, Any] | None]:
    """Which revisions serve, and a status.canary to record when a canary starts.

    The stable revision is what the live stable Deployment runs (its annotation); a spec whose
    revision differs starts a canary when spec.rollout.canary is set, and is rolled out in place
    otherwise. status.canary (advanced by the rollout controller) says how far the canary got."""
    canary_cfg = spec.rollout.canary if spec.rollout else None
    stored = spec_from_annotation(stable_live)
    if stored is None or canary_cfg is None:
        return Plan(stable=spec), None
    stable = stored.model_copy(update={f: getattr(spec, f) for f in _POLICY_FIELDS})
    current, stable_rev = revision_of(svc, spec), revision_of(svc, stable)
    try:
        cs = CanaryStatus.model_validate(canary_status) if canary_status else None
    except ValidationError:
        cs = None
    if cs is not None and cs.revision == current and cs.phase == "Promoting":
        # The stable Deployment takes the canary's revision; the canary serves until it has.
        return Plan(stable=spec, canary=spec, canary_weight=100), None
    if stable_rev == current:
        return Plan(stable=spec), None
    if cs is not None and cs.revision == current:
        if cs.phase == "Progressing":
            return Plan(stable=stable, canary=spec, canary_weight=cs.weight), None
        if cs.phase == "RolledBack":  # until the spec changes again
            return Plan(stable=stable), None
        return Plan(stable=spec), None  # promoted, but the stable Deployment was lost
    start = CanaryStatus(
        revision=current,
        stable_revision=stable_rev,
        phase="Progressing",
        step=0,
        weight=canary_cfg.steps[0],
        step_started_at=now,
        reasons=[f"canary {current} started beside stable {stable_rev}"],
    )
    plan = Plan(stable=stable, canary=spec, canary_weight=start.weight)
    return plan, start.model_dump(mode="json", by_alias=True, exclude_none=True)


def abandoned(spec: LLMServiceSpec, status: dict[str, Any]) -> bool:
    """A canary in flight whose spec.rollout.canary is gone (the change rolls out in place)."""
    phase = (status.get("canary") or {}).get("phase")
    has_cfg = spec.rollout is not None and spec.rollout.canary is not None
    return phase in ("Progressing", "Promoting") and not has_cfg
