"""The operator's few API calls, over the official client's DynamicClient.

All writes of owned objects are server-side apply under one field manager with force (the
operator owns the fields it sets, and only those: a user's extra labels survive)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kubernetes import config as kube_config
from kubernetes import dynamic
from kubernetes.client import ApiClient, Configuration
from kubernetes.dynamic.exceptions import NotFoundError, ResourceNotFoundError

from kvpilot_operator.api.types import API_VERSION

FIELD_MANAGER = "kvpilot-operator"
# Kept-alive connections to the API server. The client's default (5 per CPU: 10 here) is fewer
# than the threads that share it (kopf's handlers, the status refreshes, the autoscaler's and the
# rollouts' pools): past it each request over the limit opened, and then dropped, a new TLS
# connection, a handshake's CPU on both sides.
CONNECTIONS = 32

# Requests one reconcile has in flight at once (its reads, its applies of one stage).
FAN_OUT = 16

ObjectKey = tuple[str, str, str]  # kind, namespace ("" when cluster-scoped), name
T = TypeVar("T")
R = TypeVar("R")


def api_client(kubeconfig: str | None = None) -> ApiClient:
    """In-cluster credentials in a pod, else the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    config = Configuration()
    try:
        kube_config.load_incluster_config(client_configuration=config)
    except kube_config.ConfigException:
        kube_config.load_kube_config(config_file=kubeconfig, client_configuration=config)
    config.connection_pool_maxsize = CONNECTIONS
    return ApiClient(configuration=config)


def object_key(obj: dict[str, Any]) -> ObjectKey:
    meta = obj["metadata"]
    return (obj["kind"], meta.get("namespace") or "", meta["name"])


def own_fields(obj: dict[str, Any]) -> str | None:
    """A digest of the fields the operator's applies own in `obj` (its managedFields entry),
    None when it owns none. Another writer that changes or removes one of them takes it over
    (an update) or off the object: either way this digest changes, while writes to fields the
    operator never set (a token controller's `secrets`, a controller's status) leave it as is."""
    for entry in (obj.get("metadata") or {}).get("managedFields") or []:
        if (
            entry.get("manager") == FIELD_MANAGER
            and entry.get("operation") == "Apply"
            and not entry.get("subresource")
        ):
            canonical = json.dumps(entry.get("fieldsV1"), sort_keys=True)
            return hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()
    return None


@dataclass
class Kube:
    client: dynamic.DynamicClient
    _resources: dict[tuple[str, str], Any] = field(default_factory=dict)
    # Each owned object's own_fields() as this process last applied it.
    _applied: dict[ObjectKey, str | None] = field(default_factory=dict)
    _pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(FAN_OUT, thread_name_prefix="kvpilot-fan-out")
    )

    @classmethod
    def connect(cls, kubeconfig: str | None = None) -> Kube:
        return cls(dynamic.DynamicClient(api_client(kubeconfig)))

    def resource(self, api_version: str, kind: str) -> Any:
        key = (api_version, kind)
        if key not in self._resources:
            self._resources[key] = self.client.resources.get(api_version=api_version, kind=kind)
        return self._resources[key]

    def pdb_api_version(self) -> str:
        """policy/v1 where served (1.21+), else policy/v1beta1."""
        try:
            self.resource("policy/v1", "PodDisruptionBudget")
            return "policy/v1"
        except ResourceNotFoundError:
            return "policy/v1beta1"

    def apply(self, obj: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        """Server-side apply; with dry_run the API server validates and admits the object (as
        it would store it) without storing it."""
        res = self.resource(obj["apiVersion"], obj["kind"])
        meta = obj["metadata"]
        out = res.server_side_apply(
            body=obj,
            name=meta["name"],
            namespace=meta.get("namespace"),
            field_manager=FIELD_MANAGER,
            force_conflicts=True,
            **({"dry_run": "All"} if dry_run else {}),
        )
        stored: dict[str, Any] = out.to_dict()
        if not dry_run:
            self._applied[object_key(stored)] = own_fields(stored)
        return stored

    def drifted(self, obj: dict[str, Any]) -> bool | None:
        """Whether a watched version of an owned object has the operator's fields other than
        its last apply left them; None when this process has not applied it (yet)."""
        key = object_key(obj)
        if key not in self._applied:
            return None
        return own_fields(obj) != self._applied[key]

    def forget(self, obj: dict[str, Any]) -> None:
        """The object is gone (a watch saw it deleted)."""
        self._applied.pop(object_key(obj), None)

    def get(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> dict[str, Any] | None:
        try:
            return self.resource(api_version, kind).get(name=name, namespace=namespace).to_dict()
        except NotFoundError:
            return None

    def each(self, call: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """`call` on every item, in parallel, results in order: the same requests, but a
        reconcile waits for one round trip instead of a dozen in a row. `call` must not use
        `each` itself (the pool would wait on itself)."""
        if len(items) < 2:
            return [call(item) for item in items]
        return list(self._pool.map(call, items))

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> bool:
        """Delete (what it owns goes with it, by the garbage collector); False if absent."""
        self._applied.pop((kind, namespace or "", name), None)
        try:
            self.resource(api_version, kind).delete(name=name, namespace=namespace)
            return True
        except NotFoundError:
            return False

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        return (
            self.resource("v1", "Pod")
            .get(namespace=namespace, label_selector=selector)
            .to_dict()["items"]
        )

    def get_llmservice(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(API_VERSION, "LLMService", name, namespace)

    def get_policy(self, name: str) -> dict[str, Any] | None:
        return self.get(API_VERSION, "ServingPolicy", name)


    def patch_llmservice_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.resource(API_VERSION, "LLMService").status.patch(
            body={"status": status},
            name=name,
            namespace=namespace,
            content_type="application/merge-patch+json",
        )

    def scale_llmservice(self, namespace: str, name: str, replicas: int) -> None:
        """Through the scale subresource, as `kubectl scale` does: the one way replicas change."""
        self.resource(API_VERSION, "LLMService").scale.patch(
            body={"spec": {"replicas": replicas}},
            name=name,
            namespace=namespace,
            content_type="application/merge-patch+json",
        )
