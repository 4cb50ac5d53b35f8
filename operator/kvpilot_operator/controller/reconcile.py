"""One reconcile of one LLMService: resolve its policy, render, apply, report status.

Idempotent: applying an unchanged manifest is a no-op for the API server (no new
resourceVersion), and status is patched only when it would change, so a restarted operator, or a
reconcile triggered by its own writes, changes nothing."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kvpilot_operator.api.names import (
    TRACK_LABEL,
    engine_name,
    router_name,
    selector_labels,
    selector_string,
)
from kvpilot_operator.api.policies import Unresolved, resolve
from kvpilot_operator.api.types import LLMService, LLMServiceSpec
from kvpilot_operator.controller.kube import Kube
from kvpilot_operator.controller.manifests import (
    RenderOptions,
    SpecError,
    download_uri,
    endpoint_url,
    optional_objects,
    render,
    revision_of,
    served_name,
)
from kvpilot_operator.controller.status import (
    Problem,
    engine_failure,
    now_iso,
    source_status,
    status_patch,
)
from kvpilot_operator.rollout.adapters import plan_adapters
from kvpilot_operator.rollout.plan import abandoned, plan_rollout


@dataclass
class Outcome:
    actions: list[str] = field(default_factory=list)  # "created Deployment ns/name", ...
    problem: Problem | None = None
    status: dict[str, Any] | None = None  # the status patch sent, if any
    spec: LLMServiceSpec | None = None  # the resolved spec, when it could be resolved


@dataclass
class Desired:
    svc: LLMService | None = None
    spec: LLMServiceSpec | None = None  # resolved
    objects: list[dict[str, Any]] = field(default_factory=list)
    problem: Problem | None = None
    status: dict[str, Any] = field(default_factory=dict)  # what the plan adds: stableRevision...
    stable_live: dict[str, Any] | None = None  # the stable engine Deployment, as read to plan


PolicyLookup = Callable[[str], dict[str, Any] | None]


def desired_objects(
    kube: Kube,
    body: dict[str, Any],
    opts: RenderOptions,
    *,
    policies: PolicyLookup | None = None,
    stable_live: dict[str, Any] | None = None,
) -> Desired:
    """`policies`: where to look ServingPolicies up (the operator's index), else the API server.
    `stable_live`: the stable engine Deployment when the caller has it, else it is read."""
    try:
        svc, spec = resolve(body, policies or kube.get_policy)
    except Unresolved as err:
        return Desired(err.service, problem=Problem(err.reason, err.message))
    try:
        meta = body["metadata"]
        if stable_live is None:
            stable_live = kube.get(
                "apps/v1", "Deployment", engine_name(meta["name"]), meta["namespace"]
            )
        plan, started = plan_rollout(
            svc, spec, stable_live, (body.get("status") or {}).get("canary"), now_iso()
        )
        extra: dict[str, Any] = {"stableRevision": revision_of(svc, plan.stable)}
        shares, adapters, news = plan_adapters(
            spec, (body.get("status") or {}).get("adapters"), now_iso()
        )
        plan = dataclasses.replace(plan, adapter_canary=shares)
        if news:
            extra["adapters"] = adapters
        if started is not None:
            extra["canary"] = started
        elif abandoned(spec, body.get("status") or {}):
            extra["canary"] = None  # spec.rollout.canary removed mid-canary: nothing to show
        return Desired(
            svc, spec, render(svc, spec, opts, plan), status=extra, stable_live=stable_live
        )
    except (SpecError, ValidationError) as err:
        return Desired(svc, spec, problem=Problem("InvalidSpec", str(err)))


# Refusals that retrying the same object cannot fix (a malformed object, a rejected value);
# anything else (5xx, conflicts, quota, throttling) is transient and retried with back-off.
PERMANENT_STATUSES = {400, 422}


def _apply(
    kube: Kube, obj: dict[str, Any], *, dry_run: bool = False
) -> tuple[dict[str, Any] | None, Problem | None]:
    """Server-side apply of one object -> (the object as stored, None) or (None, why not)."""
    try:
        return kube.apply(obj, dry_run=dry_run), None
    except ApiException as err:
        kind, name = obj["kind"], obj["metadata"]["name"]
        if err.status in PERMANENT_STATUSES:
            return None, Problem("ApplyRejected", f"{kind} {name}: {_causes(err)}")
        return None, Problem("ApplyFailed", f"apply {kind} {name}: {err.reason}")


def _causes(err: ApiException) -> str:
    """The API server's own message (it names the object's field), else the HTTP reason."""
    try:
        body = json.loads(err.body or "")
    except (TypeError, ValueError):
        return str(err.reason)
    return str(body.get("message") or err.reason) if isinstance(body, dict) else str(err.reason)


def _stages(objects: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The order of a pass's applies, each stage's objects at once: the engines' Deployment
    (rendered first) alone, so that its refusal stops the pass before anything else is written;
    then the operator's own objects, among them what the other Deployments' pods need to start
    (their ServiceAccount, Role, routes: a pod of a missing ServiceAccount is refused, and its
    ReplicaSet retries with back-off); then those Deployments."""
    first, rest = objects[:1], objects[1:]
    stages = [first, [o for o in rest if o["kind"] != "Deployment"]]
    return [s for s in [*stages, [o for o in rest if o["kind"] == "Deployment"]] if s]


def engine_pods_selector(name: str) -> str:
    """The stable engines' pods (not the canary's or the shadow's: those have their own story)."""
    labels = {**selector_labels(name), TRACK_LABEL: "stable"}
    return ",".join(f"{k}={v}" for k, v in labels.items())


def _engines_missing(deployment: dict[str, Any] | None) -> bool:
    if deployment is None:
        return False
    want = (deployment.get("spec") or {}).get("replicas", 1)
    return want > 0 and ((deployment.get("status") or {}).get("availableReplicas") or 0) < want


def reconcile(
    kube: Kube,
    body: dict[str, Any],
    opts: RenderOptions,
    *,
    apply: bool = True,
    deployment: dict[str, Any] | None = None,
    policies: PolicyLookup | None = None,
) -> Outcome:
    """Bring the owned objects in line with `body` (unless apply=False: only refresh status from
    `deployment` or the live one), then patch status if it changed. `policies`: as for
    `desired_objects`."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    out = Outcome()
    # A refresh that brings the stable engines' Deployment (its watch event) plans from it.
    given = deployment if not apply else None
    desired = desired_objects(kube, body, opts, policies=policies, stable_live=given)
    svc, objects, extra = desired.svc, desired.objects, desired.status
    out.problem, out.spec = desired.problem, desired.spec
    stable = ("Deployment", engine_name(name))
    routers = ("Deployment", router_name(name))
    router: dict[str, Any] | None = None
    # What exists now, read at once (a dozen round trips in parallel rather than one after
    # another): the objects to apply, and the optional ones the plan no longer renders (none
    # when nothing was rendered: a spec refused has nothing to tidy).
    wanted = {(o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in objects}
    unwanted = [
        ref
        for ref in (optional_objects(svc) if apply and objects and svc is not None else [])
        if ref not in wanted
    ]
    reads = [
        (o["apiVersion"], o["kind"], o["metadata"]["name"], namespace)
        for o in (objects if apply else [])
        if (o["kind"], o["metadata"]["name"]) != stable  # read once, to plan the rollout
    ]
    found = kube.each(lambda ref: kube.get(*ref), reads + [(*ref, namespace) for ref in unwanted])
    live = iter(found[: len(reads)])
    present = [ref for ref, obj in zip(unwanted, found[len(reads) :], strict=True) if obj]
    befores = [
        desired.stable_live if (o["kind"], o["metadata"]["name"]) == stable else next(live)
        for o in (objects if apply else [])
    ]
    status = body.get("status") or {}
    if befores and (None in befores or status.get("observedGeneration") != meta.get("generation")):
        # A new set of objects or a new spec: the API server checks the Deployments first (a
        # server-side dry run), so a refusal leaves nothing half-created or half-updated. They
        # carry what users write (resources, node selector, tolerations, image, env); the other
        # objects are the operator's own from validated names, so are not sent twice. Only a
        # permanent refusal stops here; anything else gets its answer from the real apply.
        deployments = [o for o in objects if o["kind"] == "Deployment"]
        checked = kube.each(lambda o: _apply(kube, o, dry_run=True)[1], deployments)
        out.problem = next((p for p in checked if p and p.reason == "ApplyRejected"), None)
    applied: dict[int, dict[str, Any]] = {}  # id(object) -> as stored
    for stage in _stages(objects) if apply and out.problem is None else []:
        results = kube.each(lambda o: _apply(kube, o), stage)
        for obj, (after, problem) in zip(stage, results, strict=True):
            if after is not None:
                applied[id(obj)] = after
            out.problem = out.problem or problem  # the first refusal, in the objects' order
        if out.problem is not None:
            break
    for obj, before in zip(objects, befores, strict=False):
        kind, obj_name = obj["kind"], obj["metadata"]["name"]
        after = applied.get(id(obj))
        if after is None:
            continue
        if (kind, obj_name) == stable:
            deployment = after  # status follows the stable engines
        elif (kind, obj_name) == routers:
            router = after
        if before is None:
            out.actions.append(f"created {kind} {namespace}/{obj_name}")
        elif before["metadata"]["resourceVersion"] != after["metadata"]["resourceVersion"]:
            out.actions.append(f"updated {kind} {namespace}/{obj_name}")
    if apply and svc is not None and objects and out.problem is None:
        for api_version, kind, obj_name in present:
            if kube.delete(api_version, kind, obj_name, namespace):
                out.actions.append(f"deleted {kind} {namespace}/{obj_name}")
    if deployment is None:  # a status refresh: the Deployment as read to plan, else afresh
        deployment = desired.stable_live or kube.get(
            "apps/v1", "Deployment", engine_name(name), namespace
        )
    if router is None and deployment is not None:  # Ready needs the routers too
        router = kube.get("apps/v1", "Deployment", router_name(name), namespace)
    if out.problem is None and _engines_missing(deployment):
        # Engines wanted but not up: say why when a pod does (a start-up error, a crash loop),
        # rather than leaving users with a silent CrashLoopBackOff.
        failure = engine_failure(kube.list_pods(namespace, engine_pods_selector(name)))
        if failure is not None:
            out.problem = Problem("EngineFailing", failure)
    uri = download_uri(out.spec) if out.spec is not None else None
    downloaded: dict[str, Any] = {}
    if uri is not None:  # status refreshes too: a download ends while nothing is applied
        # The revision the pods' downloads pinned, from their init containers' statuses.
        pods = kube.list_pods(namespace, engine_pods_selector(name))
        downloaded["source"] = source_status(uri, pods)
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
        extra={**((extra or {}) if apply else {}), **downloaded},
        router=router,
    )
    if out.status is not None:
        kube.patch_llmservice_status(namespace, name, out.status)
    return out
