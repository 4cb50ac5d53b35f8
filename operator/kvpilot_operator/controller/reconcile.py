"""One reconcile of one LLMService: resolve its policy, render, apply, report status.

Idempotent: applying an unchanged manifest is a no-op for the API server (no new
resourceVersion), and status is patched only when it would change, so a restarted operator, or a
reconcile triggered by its own writes, changes nothing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kvpilot_operator.api import CanaryStatus, LLMService, LLMServiceSpec, ServingPolicy
from kvpilot_operator.kube import Kube
from kvpilot_operator.manifests import (
    Plan,
    RenderOptions,
    SpecError,
    endpoint_url,
    engine_name,
    optional_objects,
    render,
    revision_of,
    selector_string,
    served_name,
    spec_from_annotation,
)
from kvpilot_operator.policy import resolve_spec
from kvpilot_operator.status import Problem, now_iso, status_patch

# Fields of a resolved spec that say how a service scales and rolls out, not what its engines
# run: the stable revision takes them from the current spec.
_POLICY_FIELDS = ("replicas", "scaling", "slo", "rollout", "router")


@dataclass
class Outcome:
    actions: list[str] = field(default_factory=list)  # "created Deployment ns/name", ...
    problem: Problem | None = None
    status: dict[str, Any] | None = None  # the status patch sent, if any
    spec: LLMServiceSpec | None = None  # the resolved spec, when it could be resolved


def validation_message(err: ValidationError, prefix: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in (prefix, *first["loc"]))
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


def parse(body: dict[str, Any]) -> LLMService:
    return LLMService.model_validate({k: v for k, v in body.items() if k != "status"})


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


def _abandoned(spec: LLMServiceSpec, status: dict[str, Any]) -> bool:
    """A canary in flight whose spec.rollout.canary is gone (the change rolls out in place)."""
    phase = (status.get("canary") or {}).get("phase")
    has_cfg = spec.rollout is not None and spec.rollout.canary is not None
    return phase in ("Progressing", "Promoting") and not has_cfg


@dataclass
class Desired:
    svc: LLMService | None = None
    spec: LLMServiceSpec | None = None  # resolved
    objects: list[dict[str, Any]] = field(default_factory=list)
    problem: Problem | None = None
    status: dict[str, Any] = field(default_factory=dict)  # what the plan adds: stableRevision...
    stable_live: dict[str, Any] | None = None  # the stable engine Deployment, as read to plan


def desired_objects(kube: Kube, body: dict[str, Any], opts: RenderOptions) -> Desired:
    try:
        svc = parse(body)
    except ValidationError as err:
        return Desired(problem=Problem("InvalidSpec", validation_message(err, "LLMService")))
    policy = None
    if svc.spec.policy:
        policy_body = kube.get_policy(svc.spec.policy)
        if policy_body is None:
            problem = Problem("PolicyNotFound", f"ServingPolicy {svc.spec.policy!r} does not exist")
            return Desired(svc, problem=problem)
        try:
            policy = ServingPolicy.model_validate(
                {k: v for k, v in policy_body.items() if k != "status"}
            ).spec
        except ValidationError as err:
            where = f"ServingPolicy {svc.spec.policy}"
            return Desired(svc, problem=Problem("InvalidPolicy", validation_message(err, where)))
    spec = None
    try:
        spec = resolve_spec(svc.spec, policy)
        meta = body["metadata"]
        stable_live = kube.get(
            "apps/v1", "Deployment", engine_name(meta["name"]), meta["namespace"]
        )
        plan, started = plan_rollout(
            svc, spec, stable_live, (body.get("status") or {}).get("canary"), now_iso()
        )
        extra: dict[str, Any] = {"stableRevision": revision_of(svc, plan.stable)}
        if started is not None:
            extra["canary"] = started
        elif _abandoned(spec, body.get("status") or {}):
            extra["canary"] = None  # spec.rollout.canary removed mid-canary: nothing to show
        return Desired(
            svc, spec, render(svc, spec, opts, plan), status=extra, stable_live=stable_live
        )
    except (SpecError, ValidationError) as err:
        return Desired(svc, spec, problem=Problem("InvalidSpec", str(err)))


def reconcile(
    kube: Kube,
    body: dict[str, Any],
    opts: RenderOptions,
    *,
    apply: bool = True,
    deployment: dict[str, Any] | None = None,
) -> Outcome:
    """Bring the owned objects in line with `body` (unless apply=False: only refresh status from
    `deployment` or the live one), then patch status if it changed."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    out = Outcome()
    desired = desired_objects(kube, body, opts)
    svc, objects, extra = desired.svc, desired.objects, desired.status
    out.problem, out.spec = desired.problem, desired.spec
    stable = ("Deployment", engine_name(name))
    for obj in objects if apply else []:
        kind, obj_name = obj["kind"], obj["metadata"]["name"]
        if (kind, obj_name) == stable:
            before = desired.stable_live  # read once, to plan the rollout
        else:
            before = kube.get(obj["apiVersion"], kind, obj_name, namespace)
        try:
            after = kube.apply(obj)
        except ApiException as err:
            out.problem = Problem("ApplyFailed", f"apply {kind} {obj_name}: {err.reason}")
            break
        if (kind, obj_name) == stable:
            deployment = after  # status follows the stable engines
        if before is None:
            out.actions.append(f"created {kind} {namespace}/{obj_name}")
        elif before["metadata"]["resourceVersion"] != after["metadata"]["resourceVersion"]:
            out.actions.append(f"updated {kind} {namespace}/{obj_name}")
    if apply and svc is not None and objects and out.problem is None:
        wanted = {(o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in objects}
        for api_version, kind, obj_name in optional_objects(svc):
            if (api_version, kind, obj_name) not in wanted and kube.delete(
                api_version, kind, obj_name, namespace
            ):
                out.actions.append(f"deleted {kind} {namespace}/{obj_name}")
    if deployment is None:  # a status refresh: the Deployment as read to plan, else afresh
        deployment = desired.stable_live or kube.get(
            "apps/v1", "Deployment", engine_name(name), namespace
        )
    model = served_name(svc) if svc is not None else name
    endpoint = endpoint_url(svc, opts) if svc is not None else ""
    out.status = status_patch(
        body.get("status"),
        deployment=deployment,
        generation=meta.get("generation"),
        problem=out.problem,
        selector=selector_string(name),
        endpoint=endpoint,
        model=model,
        extra=extra if apply else {},
    )
    if out.status is not None:
        kube.patch_llmservice_status(namespace, name, out.status)
    return out
