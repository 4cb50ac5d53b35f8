"""kopf handlers: thin. Each one finds the LLMService(s) concerned and calls `reconcile`.

- LLMService create/update/resume -> reconcile it.
- An owned Deployment/Service/PDB changed or deleted by someone else -> reconcile its owner
  (drift correction); a Deployment status change only refreshes the owner's status.
- A ServingPolicy created/changed/deleted -> reconcile every LLMService that names it.
- Each LLMService has an autoscaler daemon (when the operator knows a Prometheus): it writes
  replicas through the scale subresource, which comes back here as an update.
- Each LLMService with spec.rollout has a rollout daemon: it steps status.canary and asks for a
  reconcile, which renders the weights and Deployments that status implies.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from typing import Any

import kopf

from kvpilot_operator.api.names import MANAGED_BY, SERVICE_LABEL, engine_name
from kvpilot_operator.api.types import GROUP, VERSION
from kvpilot_operator.autoscaler.loop import Autoscaler
from kvpilot_operator.controller.kube import Kube
from kvpilot_operator.controller.manifests import RenderOptions
from kvpilot_operator.controller.reconcile import Outcome, reconcile
from kvpilot_operator.observability import slo_series
from kvpilot_operator.rollout.controller import RolloutController

OWNED = {"app.kubernetes.io/managed-by": MANAGED_BY}


class State:
    """Set by `run()` before the handlers fire."""

    kube: Kube
    opts: RenderOptions
    autoscaler: Autoscaler | None = None
    rollouts: RolloutController | None = None


def _report(body: Any, out: Outcome) -> None:
    for action in out.actions:
        kopf.info(body, reason="Applied", message=action)
    if out.problem is not None:
        kopf.warn(body, reason=out.problem.reason, message=out.problem.message)
    if out.status and "conditions" in out.status:
        ready = next(c for c in out.status["conditions"] if c["type"] == "Ready")
        kopf.event(
            body,
            type="Normal",
            reason=f"Ready{ready['status']}",
            message=f"{ready['reason']}: {ready['message']}",
        )


# kopf serialises handlers per object, but an LLMService is also reconciled from its owned objects'
# events: one lock per LLMService keeps two reconciles of it from racing their applies.
_locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)


def service_lock(namespace: str, name: str) -> threading.Lock:
    return _locks[(namespace, name)]


def _reconcile_body(body: dict[str, Any], **kwargs: Any) -> Outcome:
    meta = body["metadata"]
    with service_lock(meta["namespace"], meta["name"]):
        # The event's status may predate the autoscaler's last write; conditions are patched as
        # one list, so start from the live ones or theirs would be lost.
        live = State.kube.get_llmservice(meta["namespace"], meta["name"])
        if live is not None:
            body = {**body, "status": live.get("status")}
        out = reconcile(State.kube, body, State.opts, **kwargs)
    slo_series.export(meta["namespace"], meta["name"], out.spec)
    _report(body, out)
    if out.problem is not None and out.problem.reason == "ApplyFailed":
        # Transient (API server, admission, quota): retry with back-off, never crash.
        raise kopf.TemporaryError(out.problem.message, delay=15)
    return out


def reconcile_now(body: dict[str, Any]) -> None:
    """For the rollout controller: carry a status.canary change to the objects now."""
    _reconcile_body(body)


@kopf.on.resume(GROUP, VERSION, "llmservices")
@kopf.on.create(GROUP, VERSION, "llmservices")
@kopf.on.update(GROUP, VERSION, "llmservices")
def on_llmservice(body: kopf.Body, **_: Any) -> None:
    _reconcile_body(dict(body))


@kopf.on.delete(GROUP, VERSION, "llmservices", optional=True)
def on_llmservice_deleted(namespace: str, name: str, **_: Any) -> None:
    slo_series.forget(namespace, name)  # the owned objects go with it (garbage collector)


def _autoscaling(**_: Any) -> bool:
    return State.autoscaler is not None


# Not spawned without a Prometheus: a daemon that ends at once would still be recorded by kopf on
# the object (a write per service at every operator start).
@kopf.daemon(GROUP, VERSION, "llmservices", cancellation_timeout=10.0, when=_autoscaling)
def autoscale(
    body: kopf.Body, namespace: str, name: str, stopped: kopf.DaemonStopped, **_: Any
) -> None:
    assert State.autoscaler is not None

    def emit(kind: str, reason: str, message: str) -> None:
        kopf.event(body, type=kind, reason=reason, message=message)

    State.autoscaler.run(namespace, name, stopped, emit)


def _has_rollout(spec: kopf.Spec, **_: Any) -> bool:
    return State.rollouts is not None and bool(spec.get("rollout"))


@kopf.daemon(GROUP, VERSION, "llmservices", cancellation_timeout=10.0, when=_has_rollout)
def rollout(
    body: kopf.Body, namespace: str, name: str, stopped: kopf.DaemonStopped, **_: Any
) -> None:
    """Steps a canary through its weights on the routers' metrics; summarises the shadow."""
    assert State.rollouts is not None

    def emit(kind: str, reason: str, message: str) -> None:
        kopf.event(body, type=kind, reason=reason, message=message)

    State.rollouts.run(namespace, name, stopped, emit)


def _owner(body: kopf.Body) -> dict[str, Any] | None:
    name = (body.get("metadata", {}).get("labels") or {}).get(SERVICE_LABEL)
    if not name:
        return None
    owner = State.kube.get_llmservice(body["metadata"]["namespace"], name)
    if owner is None or owner["metadata"].get("deletionTimestamp"):
        return None  # being garbage-collected with its owner: nothing to restore
    return owner


@kopf.on.event("apps", "v1", "deployments", labels=OWNED)
def on_deployment_event(body: kopf.Body, type: str | None, **_: Any) -> None:
    if type is None:  # the initial listing: the owners' resume handlers cover it
        return
    owner = _owner(body)
    if owner is None:
        return
    meta = body["metadata"]
    drifted = type == "DELETED" or (
        (body.get("status") or {}).get("observedGeneration") != meta.get("generation")
    )
    if drifted:
        _reconcile_body(owner)
    elif meta["name"] == engine_name(owner["metadata"]["name"]):
        _reconcile_body(owner, apply=False, deployment=dict(body))
    else:  # canary, shadow or router: status follows the stable engines, read afresh
        _reconcile_body(owner, apply=False)


@kopf.on.event("", "v1", "services", labels=OWNED)
@kopf.on.event("", "v1", "configmaps", labels=OWNED)
@kopf.on.event("", "v1", "serviceaccounts", labels=OWNED)
@kopf.on.event("rbac.authorization.k8s.io", "v1", "roles", labels=OWNED)
@kopf.on.event("rbac.authorization.k8s.io", "v1", "rolebindings", labels=OWNED)
@kopf.on.event("policy", "poddisruptionbudgets", labels=OWNED)
def on_owned_event(body: kopf.Body, type: str | None, **_: Any) -> None:
    if type not in ("MODIFIED", "DELETED"):
        return
    owner = _owner(body)
    if owner is not None:
        _reconcile_body(owner)


@kopf.on.create(GROUP, VERSION, "servingpolicies")
@kopf.on.update(GROUP, VERSION, "servingpolicies")
@kopf.on.delete(GROUP, VERSION, "servingpolicies", optional=True)
def on_policy(name: str, **_: Any) -> None:
    for svc in State.kube.list_llmservices():
        if (svc.get("spec") or {}).get("policy") == name:
            _reconcile_body(svc)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # One operator replica, no peering objects to install; kopf's own bookkeeping stays in an
    # annotation of our group rather than kopf's default one.
    settings.peering.standalone = True
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.execution.max_workers = 8
