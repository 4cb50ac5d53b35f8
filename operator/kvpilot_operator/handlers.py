"""kopf handlers: thin. Each one finds the LLMService(s) concerned and calls `reconcile`.

- LLMService create/update/resume -> reconcile it.
- An owned Deployment/Service/PDB changed or deleted by someone else -> reconcile its owner
  (drift correction); a Deployment status change only refreshes the owner's status, through a
  queue that coalesces a burst of them into one refresh per owner (`controller.coalesce`).
- A ServingPolicy created/changed/deleted -> reconcile every LLMService that names it.
- An index of LLMServices feeds two operator-wide loops (`controller.sweep`), started at startup
  and stopped at cleanup, not a kopf daemon per service (a daemon holds a worker thread for its
  service's life and makes kopf put a finalizer on it):
  - the autoscaler (when the operator knows a Prometheus) evaluates every LLMService each
    interval; it writes replicas through the scale subresource, which comes back here as an
    update;
  - the rollouts evaluate every LLMService with spec.rollout: they step status.canary and ask for
    a reconcile, which renders the weights and Deployments that status implies.
With several operator replicas, all of this runs in the holder of the Lease only
(`controller.leader`).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import socket
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import kopf

from kvpilot_operator.api.names import (
    COMPONENT_LABEL,
    MANAGED_BY,
    SERVICE_LABEL,
    TRACK_LABEL,
    engine_name,
)
from kvpilot_operator.api.types import GROUP, VERSION
from kvpilot_operator.autoscaler.loop import Autoscaler
from kvpilot_operator.controller import events
from kvpilot_operator.controller.coalesce import Coalescer
from kvpilot_operator.controller.kube import Kube
from kvpilot_operator.controller.manifests import RenderOptions
from kvpilot_operator.controller.reconcile import Outcome, reconcile
from kvpilot_operator.controller.status import find_condition
from kvpilot_operator.controller.sweep import Key, Sweep
from kvpilot_operator.observability import slo_series
from kvpilot_operator.rollout.controller import RolloutController

OWNED = {"app.kubernetes.io/managed-by": MANAGED_BY}


class State:
    """Set by `cli.cmd_operator` before the handlers fire."""

    kube: Kube
    opts: RenderOptions
    identity: str = socket.gethostname()  # this replica, in its events' reportingInstance
    autoscaler: Autoscaler | None = None
    rollouts: RolloutController | None = None
    # Set while the loops run (start_loops): status refreshes go through it.
    status_refresh: Coalescer | None = None
    status_refresh_index: Any = None  # key -> the llmservices index's value
    # ServingPolicies by name, from the index once it runs (else the reconcile asks the API).
    policies: Callable[[str], dict[str, Any] | None] | None = None


def _kopf_emit(body: Any) -> events.Emit:
    """Events from a handler, through kopf's queue."""

    def emit(kind: str, reason: str, message: str) -> None:
        kopf.event(body, type=kind, reason=reason, message=message)

    return emit


def _report(out: Outcome, emit: events.Emit, before: dict[str, Any]) -> None:
    """Events for what changed: the objects applied, and Ready or Degraded when they flip (not
    at every reconcile: a service's events would be one per status refresh)."""
    if out.actions:  # one event per pass (a new service creates ten objects)
        emit("Normal", "Applied", "; ".join(out.actions))
    patched = {c["type"]: c for c in (out.status or {}).get("conditions") or []}

    def flipped(kind: str, *fields: str) -> dict[str, Any] | None:
        new, old = patched.get(kind), find_condition(before, kind) or {}
        return new if new and any(new.get(f) != old.get(f) for f in fields) else None

    if out.problem is not None and flipped("Degraded", "status", "reason", "message"):
        emit("Warning", out.problem.reason, out.problem.message)
    ready = flipped("Ready", "status", "reason")
    if ready is not None:
        emit("Normal", f"Ready{ready['status']}", f"{ready['reason']}: {ready['message']}")


# kopf serialises handlers per object, but an LLMService is also reconciled from its owned objects'
# events: one lock per LLMService keeps two reconciles of it from racing their applies.
_locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)


def service_lock(namespace: str, name: str) -> threading.Lock:
    return _locks[(namespace, name)]


def _reconcile_body(
    body: dict[str, Any], emit: events.Emit | None = None, **kwargs: Any
) -> Outcome:
    meta = body["metadata"]
    with service_lock(meta["namespace"], meta["name"]):
        # The event's status may predate the autoscaler's last write; conditions are patched as
        # one list, so start from the live ones or theirs would be lost.
        live = State.kube.get_llmservice(meta["namespace"], meta["name"])
        if live is not None:
            body = {**body, "status": live.get("status")}
        out = reconcile(State.kube, body, State.opts, policies=State.policies, **kwargs)
    slo_series.export(meta["namespace"], meta["name"], out.spec)
    _report(out, emit or _kopf_emit(body), body)
    if out.problem is not None and out.problem.reason == "ApplyFailed":
        # Transient (API server, admission, quota): retry with back-off, never crash.
        raise kopf.TemporaryError(out.problem.message, delay=15)
    return out


def reconcile_now(body: dict[str, Any]) -> None:
    """For the rollout loop: carry a status.canary change to the objects now. It runs outside
    kopf's handlers, so its events are posted directly."""
    _reconcile_body(body, events.emitter(State.kube, events.object_ref(body), State.identity))


@kopf.on.resume(GROUP, VERSION, "llmservices")
@kopf.on.create(GROUP, VERSION, "llmservices")
@kopf.on.update(GROUP, VERSION, "llmservices")
def on_llmservice(body: kopf.Body, **_: Any) -> None:
    _reconcile_body(dict(body))


@kopf.on.delete(GROUP, VERSION, "llmservices", optional=True)
def on_llmservice_deleted(namespace: str, name: str, **_: Any) -> None:
    slo_series.forget(namespace, name)  # the owned objects go with it (garbage collector)


@kopf.index(GROUP, VERSION, "llmservices")
async def llmservices(
    body: kopf.Body, namespace: str, name: str, spec: kopf.Spec, **_: Any
) -> dict[Key, dict[str, Any]]:
    """What the loops need of each LLMService: the object their events are about, and whether it
    has a rollout. Kept in memory by kopf; no write to the object."""
    return {
        (namespace, name): {
            "ref": events.object_ref(dict(body)),
            # Adapter canaries and shadows are rollouts too.
            "rollout": bool(spec.get("rollout"))
            or any(
                isinstance(a, dict) and (a.get("canary") or a.get("shadow"))
                for a in spec.get("adapters") or []
            ),
            # The object as the watch last saw it: the loops and the owned objects' handlers
            # read it here instead of asking the API server each time.
            "body": copy.deepcopy(dict(body)),
        }
    }


@kopf.index(GROUP, VERSION, "servingpolicies")
async def servingpolicies(body: kopf.Body, name: str, **_: Any) -> dict[str, dict[str, Any]]:
    return {name: copy.deepcopy(dict(body))}


@kopf.index("apps", "v1", "deployments", labels={**OWNED, TRACK_LABEL: "stable"})
async def engines(body: kopf.Body, namespace: str, labels: kopf.Labels, **_: Any) -> Any:
    """Each service's stable engine Deployment (the autoscaler reads its ready replicas)."""
    if labels.get(COMPONENT_LABEL) != "engine" or SERVICE_LABEL not in labels:
        return None
    return {(namespace, labels[SERVICE_LABEL]): copy.deepcopy(dict(body))}


def _one(index: kopf.Index, key: Any) -> Any:
    """The value an index holds for `key` (one per key here), or None."""
    store = index.get(key)
    return next(iter(store), None) if store is not None else None


def _services(index: kopf.Index, *, rollout: bool = False) -> dict[Key, dict[str, Any]]:
    return {
        key: value
        for key, store in index.items()
        for value in store
        if value["rollout"] or not rollout
    }


def _sweeps(index: kopf.Index) -> Iterator[tuple[Sweep, Any]]:
    """(loop, the services it evaluates) for the autoscaler and the rollouts, as configured."""

    def emit(svc: dict[str, Any]) -> events.Emit:
        return events.emitter(State.kube, svc["ref"], State.identity)

    scaler, rollouts = State.autoscaler, State.rollouts
    if scaler is not None:
        sweep = Sweep(
            "autoscaler",
            scaler.interval,
            evaluate=lambda key, svc: scaler.tick(*key, emit(svc), svc["body"]),
            forget=lambda key: scaler.forget(*key),
        )
        yield sweep, lambda: _services(index)
    if rollouts is not None:
        sweep = Sweep(
            "rollouts",
            rollouts.interval,
            evaluate=lambda key, svc: rollouts.tick(*key, emit(svc), svc["body"]),
            forget=lambda key: rollouts.forget(*key),
        )
        yield sweep, lambda: _services(index, rollout=True)


def _owner(body: kopf.Body, llmservices: kopf.Index) -> dict[str, Any] | None:
    name = (body.get("metadata", {}).get("labels") or {}).get(SERVICE_LABEL)
    if not name:
        return None
    found = _one(llmservices, (body["metadata"]["namespace"], name))
    owner = found["body"] if found is not None else None
    if owner is None or owner["metadata"].get("deletionTimestamp"):
        return None  # being garbage-collected with its owner: nothing to restore
    return owner


@kopf.on.event("apps", "v1", "deployments", labels=OWNED)
def on_deployment_event(
    body: kopf.Body, type: str | None, llmservices: kopf.Index, **_: Any
) -> None:
    if type is None:  # the initial listing: the owners' resume handlers cover it
        return
    owner = _owner(body, llmservices)
    if owner is None:
        return
    meta = body["metadata"]
    # A spec the deployment controller has not caught up with: someone changed it. Not one it
    # has never observed (the operator's own creation, whose first events are its annotations).
    seen = (body.get("status") or {}).get("observedGeneration")
    drifted = type == "DELETED" or (seen is not None and seen != meta.get("generation"))
    if type == "DELETED":
        State.kube.forget(body)
    if drifted:
        _reconcile_body(owner)
        return
    # A rollout's progress: only the owner's status follows, once per burst of such events and
    # off kopf's threads, so that it never queues in front of a new service's creation.
    stable = meta["name"] == engine_name(owner["metadata"]["name"])
    deployment = dict(body) if stable else None  # else status reads the stable engines afresh
    key = (meta["namespace"], owner["metadata"]["name"])
    if State.status_refresh is None or not State.status_refresh.mark(key, deployment):
        _reconcile_body(owner, apply=False, deployment=deployment)


def _refresh_status(key: Key, deployment: dict[str, Any] | None) -> None:
    """The status-refresh queue's work: the owner as the index holds it now."""
    found = State.status_refresh_index(key) if State.status_refresh_index else None
    owner = found["body"] if found is not None else None
    if owner is None or owner["metadata"].get("deletionTimestamp"):
        return
    emit = events.emitter(State.kube, events.object_ref(owner), State.identity)
    try:
        _reconcile_body(owner, emit, apply=False, deployment=deployment)
    except kopf.TemporaryError as e:  # only applies raise it; a refresh applies nothing
        logging.getLogger("kvpilot.operator").warning("status refresh of %s/%s: %s", *key, e)


# What a service owns besides its Deployments (those have handlers of their own above), as kopf
# names resources.
OWNED_KINDS: tuple[tuple[str, ...], ...] = (
    ("", "v1", "services"),
    ("", "v1", "configmaps"),
    ("", "v1", "serviceaccounts"),
    ("rbac.authorization.k8s.io", "v1", "roles"),
    ("rbac.authorization.k8s.io", "v1", "rolebindings"),
    ("policy", "poddisruptionbudgets"),
    ("networking.k8s.io", "v1", "networkpolicies"),
)


def on_owned_event(body: kopf.Body, type: str | None, llmservices: kopf.Index, **_: Any) -> None:
    if type == "DELETED":
        State.kube.forget(body)
    elif type == "MODIFIED":
        drifted = State.kube.drifted(body)
        if drifted is False:
            # Another writer's fields only: the token controller adding a ServiceAccount's
            # secret, the disruption controller's PDB status. Reconciling on those made a second
            # full pass over every new service.
            return
        seen = (body.get("status") or {}).get("observedGeneration")
        if drifted is None and seen is not None and seen == body["metadata"].get("generation"):
            # Not applied by this process yet (a restart): a controller writing status is
            # still no change of what the operator wrote.
            return
    else:
        return
    owner = _owner(body, llmservices)
    if owner is not None:
        _reconcile_body(owner)


for _kind in OWNED_KINDS:
    kopf.on.event(*_kind, labels=OWNED)(on_owned_event)


@kopf.on.create(GROUP, VERSION, "servingpolicies")
@kopf.on.update(GROUP, VERSION, "servingpolicies")
@kopf.on.delete(GROUP, VERSION, "servingpolicies", optional=True)
def on_policy(name: str, llmservices: kopf.Index, **_: Any) -> None:
    # From the index, not a list: with watchNamespaces the operator may not list LLMServices
    # across the cluster, and the index holds exactly those it serves.
    for svc in [v["body"] for store in llmservices.values() for v in store]:
        if (svc.get("spec") or {}).get("policy") == name:
            _reconcile_body(svc)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # No kopf peering: of several replicas only the Lease holder runs kopf at all
    # (controller.leader). kopf's own bookkeeping stays in an annotation of our group rather
    # than kopf's default one.
    settings.peering.standalone = True
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.posting.level = logging.INFO
    settings.posting.reporting_component = events.COMPONENT
    settings.posting.reporting_instance = State.identity
    settings.watching.server_timeout = 300
    # The owned kinds are watched through a label selector, so the API server sends only the
    # operator's own objects rather than every Deployment, Service, ConfigMap... of the cluster
    # for kopf to filter here. kopf before label_selectors filters on the handlers' labels= only.
    selectors = getattr(settings.watching, "label_selectors", None)
    if selectors is not None:
        for kind in (("apps", "v1", "deployments"), *OWNED_KINDS):
            selectors[kind] = ",".join(f"{k}={v}" for k, v in OWNED.items())
    # Only handlers use these threads, each for one reconcile: the loops have pools of their own.
    settings.execution.max_workers = 8


@kopf.on.startup()
async def start_loops(
    memo: kopf.Memo,
    llmservices: kopf.Index,
    servingpolicies: kopf.Index,
    engines: kopf.Index,
    **_: Any,
) -> None:
    """The autoscaler's and the rollouts' loops, fed by the index (filled once watching starts).
    They read services, policies and engine Deployments from the indexes: at rest, an
    evaluation asks the API server nothing (Prometheus is asked)."""
    # A policy the index does not hold (yet) is asked for: a service that names one created a
    # moment ago is not reported missing while the watch catches up.
    State.policies = lambda name: _one(servingpolicies, name) or State.kube.get_policy(name)
    if State.autoscaler is not None:
        State.autoscaler.policies = lambda name: _one(servingpolicies, name)
        State.autoscaler.engines = lambda namespace, name: _one(engines, (namespace, name))
    memo.loops_stopped = asyncio.Event()
    memo.loops = [
        asyncio.create_task(sweep.run(services, memo.loops_stopped), name=f"kvpilot {sweep.name}")
        for sweep, services in _sweeps(llmservices)
    ]
    State.status_refresh_index = lambda key: _one(llmservices, key)
    State.status_refresh = Coalescer("status-refresh", _refresh_status)
    memo.loops.append(
        asyncio.create_task(
            State.status_refresh.run(memo.loops_stopped), name="kvpilot status-refresh"
        )
    )


@kopf.on.cleanup()
async def stop_loops(memo: kopf.Memo, **_: Any) -> None:
    stopped: asyncio.Event | None = getattr(memo, "loops_stopped", None)
    if stopped is not None:
        stopped.set()
        await asyncio.gather(*memo.loops, return_exceptions=True)
