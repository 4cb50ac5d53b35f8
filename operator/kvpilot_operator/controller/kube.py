"""The operator's few API calls, over the official client's DynamicClient.

All writes of owned objects are server-side apply under one field manager with force (the
operator owns the fields it sets, and only those: a user's extra labels survive)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubernetes import config as kube_config
from kubernetes import dynamic
from kubernetes.client import ApiClient
from kubernetes.dynamic.exceptions import NotFoundError, ResourceNotFoundError

from kvpilot_operator.api.types import API_VERSION

FIELD_MANAGER = "kvpilot-operator"


def api_client(kubeconfig: str | None = None) -> ApiClient:
    """In-cluster credentials in a pod, else the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    try:
        kube_config.load_incluster_config()
        return ApiClient()
    except kube_config.ConfigException:
        return kube_config.new_client_from_config(config_file=kubeconfig)


@dataclass
class Kube:
    client: dynamic.DynamicClient
    _resources: dict[tuple[str, str], Any] = field(default_factory=dict)

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
        return out.to_dict()

    def get(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> dict[str, Any] | None:
        try:
            return self.resource(api_version, kind).get(name=name, namespace=namespace).to_dict()
        except NotFoundError:
            return None

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> bool:
        """Delete (what it owns goes with it, by the garbage collector); False if absent."""
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
