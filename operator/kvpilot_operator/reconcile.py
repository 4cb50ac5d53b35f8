"""One reconcile of one LLMService: resolve its policy, render, apply, report status.

Idempotent: applying an unchanged manifest is a no-op for the API server (no new
resourceVersion), and status is patched only when it would change, so a restarted operator, or a
reconcile triggered by its own writes, changes nothing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kvpilot_operator.api import LLMService, ServingPolicy
from kvpilot_operator.kube import Kube
from kvpilot_operator.manifests import (
    RenderOptions,
    SpecError,
    endpoint_url,
    engine_name,
    render,
    selector_string,
    served_name,
)
from kvpilot_operator.policy import resolve_spec
from kvpilot_operator.status import Problem, status_patch


@dataclass
class Outcome:
    actions: list[str] = field(default_factory=list)  # "created Deployment ns/name", ...
    problem: Problem | None = None
    status: dict[str, Any] | None = None  # the status patch sent, if any


def validation_message(err: ValidationError, prefix: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in (prefix, *first["loc"]))
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


def parse(body: dict[str, Any]) -> LLMService:
    return LLMService.model_validate({k: v for k, v in body.items() if k != "status"})


def desired_objects(
    kube: Kube, body: dict[str, Any], opts: RenderOptions
) -> tuple[LLMService | None, list[dict[str, Any]], Problem | None]:
    try:
        svc = parse(body)
    except ValidationError as err:
        return None, [], Problem("InvalidSpec", validation_message(err, "LLMService"))
    policy = None
    if svc.spec.policy:
        policy_body = kube.get_policy(svc.spec.policy)
        if policy_body is None:
            return (
                svc,
                [],
                Problem("PolicyNotFound", f"ServingPolicy {svc.spec.policy!r} does not exist"),
            )
        try:
            policy = ServingPolicy.model_validate(
                {k: v for k, v in policy_body.items() if k != "status"}
            ).spec
        except ValidationError as err:
            return (
                svc,
                [],
                Problem(
                    "InvalidPolicy", validation_message(err, f"ServingPolicy {svc.spec.policy}")
                ),
            )
    try:
        return svc, render(svc, resolve_spec(svc.spec, policy), opts), None
    except (SpecError, ValidationError) as err:
        return svc, [], Problem("InvalidSpec", str(err))


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
    svc, objects, out.problem = desired_objects(kube, body, opts)
    for obj in objects if apply else []:
        kind, obj_name = obj["kind"], obj["metadata"]["name"]
        before = kube.get(obj["apiVersion"], kind, obj_name, namespace)
        try:
            after = kube.apply(obj)
        except ApiException as err:
            out.problem = Problem("ApplyFailed", f"apply {kind} {obj_name}: {err.reason}")
            break
        if kind == "Deployment":
            deployment = after
        if before is None:
            out.actions.append(f"created {kind} {namespace}/{obj_name}")
        elif before["metadata"]["resourceVersion"] != after["metadata"]["resourceVersion"]:
            out.actions.append(f"updated {kind} {namespace}/{obj_name}")
    if deployment is None:
        deployment = kube.get("apps/v1", "Deployment", engine_name(name), namespace)
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
    )
    if out.status is not None:
        kube.patch_llmservice_status(namespace, name, out.status)
    return out
