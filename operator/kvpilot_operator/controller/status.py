"""LLMService status as a pure function of what the operator saw: the live engine Deployment and
the outcome of the last reconcile. Conditions follow Kubernetes conventions (type, status,
reason in CamelCase, message, lastTransitionTime that moves only when status flips)."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

READY, PROGRESSING, DEGRADED = "Ready", "Progressing", "Degraded"


@dataclass(frozen=True)
class Problem:
    """Why the operator cannot serve the spec as written (-> Degraded)."""

    # InvalidSpec, PolicyNotFound, InvalidPolicy, ApplyRejected (permanent), ApplyFailed (retried)
    reason: str
    message: str


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def find_condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The condition of type `kind` in any object's status (Deployment, LLMService)."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return cond
    return None


# Waiting reasons of a container that will not start by itself.
STUCK_WAITING = {
    "CrashLoopBackOff", "ErrImagePull", "ImagePullBackOff", "InvalidImageName",
    "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
}  # fmt: skip
MAX_FAILURE_MESSAGE = 400


def _condense(message: str) -> str:
    """A termination message as one readable line: the engine logs JSON, and on a failed start
    its last line is the reason (`FallbackToLogsOnError` gives the log's tail)."""
    for line in reversed([ln.strip() for ln in message.splitlines() if ln.strip()]):
        try:
            record = json.loads(line)
        except ValueError:
            return line[:MAX_FAILURE_MESSAGE]
        if isinstance(record, dict):
            text = record.get("error") or record.get("event")
            if text:
                return str(text)[:MAX_FAILURE_MESSAGE]
    return ""


def engine_failure(pods: list[dict[str, Any]]) -> str | None:
    """Why the engine pods do not come up, from their container statuses (a start-up error's
    termination message, an image that cannot be pulled, a crash loop), or None."""
    for pod in pods:
        name = pod["metadata"]["name"]
        status = pod.get("status") or {}
        # Init containers first: the downloads (the model's, a draft's, each adapter's) run
        # before the engine, and a failed one is why the engine never starts.
        statuses = [
            *(status.get("initContainerStatuses") or []),
            *(status.get("containerStatuses") or []),
        ]
        for cs in statuses:
            what = f"engine pod {name}"
            if cs.get("name") == "model-download":
                what = f"model download in engine pod {name}"
            elif cs.get("name") == "draft-model-download":
                what = f"draft model download (spec.speculative.draftModel) in engine pod {name}"
            elif cs.get("name", "").startswith("adapter-"):  # adapter-<name>[-canary|-shadow]
                adapter = cs["name"].removeprefix("adapter-")
                what = f"download of adapter {adapter} (spec.adapters) in engine pod {name}"
            for state in (cs.get("state") or {}, cs.get("lastState") or {}):
                ended = state.get("terminated") or {}
                if ended.get("exitCode"):
                    why = _condense(ended.get("message") or "") or ended.get("reason") or "Error"
                    if "speculative_config" in why:  # the engine's name for spec.speculative
                        why = f"spec.speculative: {why}"
                    return f"{what} exited with code {ended['exitCode']}: {why}"
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in STUCK_WAITING:
                return f"{what}: {waiting['reason']}: {waiting.get('message', '')}"
    return None


def source_status(uri: str, pods: list[dict[str, Any]]) -> dict[str, Any]:
    """status.source for a downloaded model: the URI, the revision the engine pods' downloads
    pinned it to (each init container's termination message is `kvpilot download`'s result),
    every revision when the pods disagree, and how many pods are downloading now."""
    revisions: set[str] = set()
    downloading = 0
    for pod in pods:
        for cs in (pod.get("status") or {}).get("initContainerStatuses") or []:
            if cs.get("name") != "model-download":
                continue
            state = cs.get("state") or {}
            downloading += "running" in state
            ended = state.get("terminated") or {}
            if ended.get("exitCode") == 0:
                try:
                    revision = json.loads(ended.get("message") or "{}").get("revision")
                except (ValueError, AttributeError):
                    revision = None
                if isinstance(revision, str) and revision:
                    revisions.add(revision)
    out: dict[str, Any] = {"uri": uri, "downloading": downloading}
    if len(revisions) == 1:
        out["revision"] = next(iter(revisions))
    elif revisions:  # replicas serving different weights: a branch moved between their starts
        out["revisions"] = sorted(revisions)
    return out


def router_unavailable(router: dict[str, Any] | None) -> str | None:
    """Why clients cannot reach the service through its routers, or None when they can: the
    engines may be up, but every request goes through a router (a router waiting on a missing
    API-key Secret, say, serves nobody)."""
    if router is None:
        return "the router Deployment does not exist yet"
    want = (router.get("spec") or {}).get("replicas", 1)
    available = (router.get("status") or {}).get("availableReplicas") or 0
    return None if want == 0 or available >= 1 else f"0/{want} router replicas available"


def engine_conditions(
    deployment: dict[str, Any] | None,
    generation: int | None,
    problem: Problem | None,
    router: dict[str, Any] | None = None,
) -> list[dict[str, str]]:
    """[Ready, Progressing, Degraded] as (type, status, reason, message) dicts. Ready needs an
    available engine and an available router."""
    if deployment is None:
        ready = ("False", "DeploymentNotFound", "the engine Deployment does not exist yet")
        progressing = ("True", "Creating", "creating the engine Deployment")
        if problem is not None:
            progressing = ("False", problem.reason, "waiting for a spec the operator can serve")
    else:
        spec = deployment.get("spec") or {}
        st = deployment.get("status") or {}
        want = spec.get("replicas", 1)
        available = st.get("availableReplicas") or 0
        updated = st.get("updatedReplicas") or 0
        ready_n = st.get("readyReplicas") or 0
        current = st.get("replicas") or 0
        if want == 0:
            ready = ("False", "ScaledToZero", "no engine replicas are wanted")
        elif available >= 1:
            ready = (
                "True",
                "MinimumReplicasAvailable",
                f"{available}/{want} engine replicas ready",
            )
        else:
            ready = ("False", "NoReadyReplicas", f"0/{want} engine replicas ready")
        blocked = router_unavailable(router)
        if ready[0] == "True" and blocked is not None:
            ready = ("False", "RouterUnavailable", f"{ready[2]}, but {blocked}")
        caught_up = (st.get("observedGeneration") or 0) >= (
            deployment["metadata"].get("generation") or 0
        )
        if not caught_up:
            progressing = ("True", "RollingOut", "the engine Deployment is being updated")
        elif updated < want:
            progressing = ("True", "RollingOut", f"{updated}/{want} engine replicas updated")
        elif ready_n < want:
            progressing = ("True", "ScalingUp", f"{ready_n}/{want} engine replicas ready")
        elif current > want:
            progressing = ("True", "ScalingDown", f"{current} engine replicas, want {want}")
        else:
            progressing = ("False", "RolloutComplete", f"{want} engine replicas up to date")
    if problem is not None:
        degraded = ("True", problem.reason, problem.message)
    else:
        stalled = find_condition(deployment or {}, "Progressing")
        failure = find_condition(deployment or {}, "ReplicaFailure")
        if stalled and stalled.get("status") == "False":
            degraded = (
                "True",
                stalled.get("reason") or "RolloutStalled",
                stalled.get("message") or "",
            )
        elif failure and failure.get("status") == "True":
            degraded = ("True", "ReplicaFailure", failure.get("message") or "")
        else:
            degraded = ("False", "AsExpected", "")
    out = []
    for kind, (status, reason, message) in (
        (READY, ready),
        (PROGRESSING, progressing),
        (DEGRADED, degraded),
    ):
        cond = condition(kind, (status, reason, message))
        if generation is not None:
            cond["observedGeneration"] = generation
        out.append(cond)
    return out


def condition(kind: str, value: tuple[str, str, str]) -> dict[str, Any]:
    """A condition from (status, reason, message)."""
    status, reason, message = value
    # Never an empty message: Kubernetes 1.20 reads "" in a CR as null and rejects it.
    return {"type": kind, "status": status, "reason": reason, "message": message or reason}


def merge_conditions(
    old: list[dict[str, Any]] | None, new: list[dict[str, Any]], now: str
) -> list[dict[str, Any]]:
    """New conditions, keeping each one's lastTransitionTime while its status is unchanged and
    keeping conditions of other types (e.g. the autoscaler's) as they are. Each keeps its place
    in the list, new types go at the end: the reconcile and the autoscaler write different types
    into the one list, and an order that followed the last writer made each see a change after
    the other's write, so every status refresh and every autoscaler pass patched status again."""
    updates = {c["type"]: c for c in new}
    merged = []
    for before in old or []:
        cond = updates.pop(before.get("type"), None)
        if cond is None:
            merged.append(before)
            continue
        same = before.get("status") == cond["status"]
        since = before.get("lastTransitionTime") if same else None
        merged.append({**cond, "lastTransitionTime": since or now})
    return merged + [{**c, "lastTransitionTime": now} for c in new if c["type"] in updates]


def status_patch(
    current: dict[str, Any] | None,
    *,
    deployment: dict[str, Any] | None,
    generation: int | None,
    problem: Problem | None,
    selector: str,
    endpoint: str,
    model: str,
    extra: dict[str, Any] | None = None,
    router: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The status fields to patch, or None when nothing would change (no churn, no event)."""
    current = current or {}
    st = (deployment or {}).get("status") or {}
    wanted: dict[str, Any] = {
        "observedGeneration": generation,
        "replicas": st.get("replicas") or 0,
        "readyReplicas": st.get("readyReplicas") or 0,
        "selector": selector,
        "endpoint": endpoint,
        "model": model,
        **(extra or {}),
    }
    # Kubernetes 1.20 reads "" in a custom resource as null, which its schema refuses: a field
    # with nothing to say (no endpoint for a spec that does not parse) is left out.
    wanted = {k: v for k, v in wanted.items() if v != ""}
    conditions = engine_conditions(deployment, generation, problem, router)
    merged = merge_conditions(current.get("conditions"), conditions, now_iso())
    changed = {k: v for k, v in wanted.items() if current.get(k) != v}
    if strip_times(merged) != strip_times(current.get("conditions") or []):
        changed["conditions"] = merged
    return changed or None


def strip_times(conditions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in conditions]
