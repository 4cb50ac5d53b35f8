"""MemoryKube: an in-memory stand-in for the operator's Kubernetes wrapper
(`kvpilot_operator.controller.kube.Kube`), so the reconcile's apply / delete / status logic runs in
milliseconds. It is a stand-in, named as such: no admission, no defaulting, no garbage collector,
no controllers. The live-cluster tests (tests/operator/test_operator.py) cover what it leaves out.

What it keeps of the API server's behaviour is what the reconcile relies on:
- `apply` of an unchanged object is a no-op (same resourceVersion); a changed one gets a new
  resourceVersion, and the server's own fields (status, uid) survive it;
- status and scale writes are JSON merge patches;
- `get` of an absent object is None; `delete` of one is False;
- `fail_apply` makes applies of a kind raise ApiException, as an API server refusing them does.
"""

from __future__ import annotations

import copy
import itertools
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException
from kvpilot_operator.api.types import API_VERSION

Key = tuple[str, str, str, str]  # apiVersion, kind, namespace ("" when cluster-scoped), name
_SERVER_FIELDS = ("resourceVersion", "uid", "creationTimestamp", "generation")


def merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386: None removes a key, mappings merge, anything else replaces."""
    out = dict(target)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_patch(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _key(api_version: str, kind: str, name: str, namespace: str | None) -> Key:
    return (api_version, kind, namespace or "", name)


def _content(obj: dict[str, Any]) -> dict[str, Any]:
    """What an apply sets: everything but status and the server's metadata."""
    meta = {k: v for k, v in obj.get("metadata", {}).items() if k not in _SERVER_FIELDS}
    return {**{k: v for k, v in obj.items() if k != "status"}, "metadata": meta}


@dataclass
class MemoryKube:
    objects: dict[Key, dict[str, Any]] = field(default_factory=dict)
    # kind -> (HTTP status, reason) to refuse its applies with
    fail_apply: dict[str, tuple[int, str]] = field(default_factory=dict)
    calls: list[tuple[str, str, str]] = field(default_factory=list)  # (verb, kind, name)
    _versions: itertools.count = field(default_factory=lambda: itertools.count(1))

    # --- for the tests ---------------------------------------------------------------------

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Store an object as a user's `kubectl create` would (generation 1)."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("generation", 1)
        meta.setdefault("uid", str(uuid.uuid4()))
        return self._store(obj)

    def update_spec(self, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Replace an LLMService's spec as `kubectl apply` would (generation + 1)."""
        obj = self.objects[_key(API_VERSION, "LLMService", name, namespace)]
        obj["spec"] = copy.deepcopy(spec)
        obj["metadata"]["generation"] += 1
        return self._store(obj)

    def set_status(
        self, api_version: str, kind: str, name: str, namespace: str, status: Any
    ) -> None:
        """Write an object's status as its controller would (a ReplicaSet's, a kubelet's)."""
        obj = self.objects[_key(api_version, kind, name, namespace)]
        obj["status"] = copy.deepcopy(status)
        self._store(obj)

    def _store(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        meta["resourceVersion"] = str(next(self._versions))
        key = _key(obj["apiVersion"], obj["kind"], meta["name"], meta.get("namespace"))
        self.objects[key] = obj
        return copy.deepcopy(obj)

    # --- the Kube interface ------------------------------------------------------------------

    def pdb_api_version(self) -> str:
        return "policy/v1"

    def apply(self, obj: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        meta = obj["metadata"]
        self.calls.append(("dry-run" if dry_run else "apply", obj["kind"], meta["name"]))
        if obj["kind"] in self.fail_apply:
            status, reason = self.fail_apply[obj["kind"]]
            raise ApiException(status=status, reason=reason)
        key = _key(obj["apiVersion"], obj["kind"], meta["name"], meta.get("namespace"))
        before = self.objects.get(key)
        if dry_run:
            return copy.deepcopy(before or obj)
        if before is not None and _content(before) == _content(obj):
            return copy.deepcopy(before)
        new = copy.deepcopy(obj)
        if before is not None:
            new["metadata"] = {
                **new["metadata"],
                **{k: v for k, v in before["metadata"].items() if k in _SERVER_FIELDS},
            }
            if "status" in before:
                new["status"] = before["status"]
        else:
            new["metadata"]["uid"] = str(uuid.uuid4())
        return self._store(new)

    def get(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> dict[str, Any] | None:
        obj = self.objects.get(_key(api_version, kind, name, namespace))
        return copy.deepcopy(obj) if obj is not None else None

    def each(self, call: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        return [call(item) for item in items]  # in order: the stand-in is not thread-safe

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> bool:
        self.calls.append(("delete", kind, name))
        return self.objects.pop(_key(api_version, kind, name, namespace), None) is not None

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        """Pods (created with `create`, as a ReplicaSet controller would) matching an equality
        selector `k=v,k2=v2`."""
        wanted = dict(part.split("=", 1) for part in selector.split(","))
        return [
            copy.deepcopy(o)
            for k, o in self.objects.items()
            if k[1] == "Pod"
            and k[2] == namespace
            and wanted.items() <= (o["metadata"].get("labels") or {}).items()
        ]

    def get_llmservice(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(API_VERSION, "LLMService", name, namespace)

    def get_policy(self, name: str) -> dict[str, Any] | None:
        return self.get(API_VERSION, "ServingPolicy", name)


    def patch_llmservice_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.calls.append(("patch-status", "LLMService", name))
        obj = self.objects[_key(API_VERSION, "LLMService", name, namespace)]
        obj["status"] = merge_patch(obj.get("status") or {}, status)
        self._store(obj)

    def scale_llmservice(self, namespace: str, name: str, replicas: int) -> None:
        self.calls.append(("scale", "LLMService", name))
        obj = self.objects[_key(API_VERSION, "LLMService", name, namespace)]
        obj["spec"] = merge_patch(obj["spec"], {"replicas": replicas})
        self._store(obj)
