"""Kubernetes events from the operator's loops (the autoscaler and rollout sweeps, `sweep.py`).

They run on threads of their own, outside kopf's handlers, where `kopf.event` has no queue to
post to; so they post here, with the fields kopf's poster writes and the same reporting
component and instance (`handlers.configure` gives kopf both). An event is auxiliary: a failure
to post one is logged, never raised.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from kvpilot_operator.controller.kube import Kube

log = logging.getLogger("kvpilot.events")

COMPONENT = "kvpilot-operator"
MAX_MESSAGE = 1024  # the API server refuses longer messages

Emit = Callable[[str, str, str], None]  # (type, reason, message) -> one event


def object_ref(body: dict[str, Any]) -> dict[str, Any]:
    """The involvedObject of an event about `body`."""
    meta = body["metadata"]
    return {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "name": meta["name"],
        "namespace": meta.get("namespace"),
        "uid": meta.get("uid"),
    }


def post(
    kube: Kube, ref: dict[str, Any], type: str, reason: str, message: str, instance: str
) -> None:
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 3] + "..."
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    body = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"namespace": ref["namespace"], "generateName": f"{ref['name']}."},
        "type": type,
        "reason": reason,
        "message": message,
        "involvedObject": ref,
        "reportingComponent": COMPONENT,
        "reportingInstance": instance,
        "source": {"component": COMPONENT},  # the "From" column of `kubectl describe`
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    try:
        kube.resource("v1", "Event").create(body=body, namespace=ref["namespace"])
    except Exception as err:
        log.warning("posting event %s (%s) about %s failed: %s", reason, message, ref["name"], err)


def emitter(kube: Kube, ref: dict[str, Any], instance: str) -> Emit:
    """An `Emit` for the object `ref` names."""

    def emit(type: str, reason: str, message: str) -> None:
        post(kube, ref, type, reason, message, instance)

    return emit
