"""The router's Kubernetes discovery against a real kube-apiserver (tests/operator/conftest.py):
routes from the ConfigMap `<service>-router`, endpoints from the service's ready pods.

No kubelet runs here, so each test writes pod status (IP, Ready) as a kubelet would.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config
from kvpilot_operator.local.cluster import LocalCluster
from kvpilot_operator.router.config import Endpoint, Revision, Shadow
from kvpilot_operator.router.discovery import KubernetesSource, Snapshot

from tests.support.kube import service_account_kubeconfig

pytestmark = pytest.mark.slow

SERVICE = "chat"


def pod(name: str, revision: str, component: str = "engine", service: str = SERVICE) -> dict:
    labels = {
        "kvpilot.io/llmservice": service,
        "app.kubernetes.io/component": component,
        "kvpilot.io/revision": revision,
    }
    if component == "shadow":
        labels["kvpilot.io/role"] = "shadow"
    ports = [{"name": "http", "containerPort": 8001}] if name == "engine-1" else []
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "engine", "image": "kvpilot/engine", "ports": ports}]},
    }


def kubelet_status(ip: str | None, ready: bool) -> dict[str, Any]:
    """The status a kubelet reports for a running pod (Ready or not)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    status: dict[str, Any] = {
        "phase": "Running",
        "conditions": [
            {"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": now}
        ],
    }
    if ip is not None:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    return {"status": status}


def routes_config_map(routes: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{SERVICE}-router"},
        "data": {"routes.json": routes},
    }


def changed(source: KubernetesSource, want: Callable[[Snapshot], bool]) -> Snapshot:
    """The first snapshot the watches deliver that satisfies `want` (changes arrive in ms)."""
    deadline = time.monotonic() + 10
    while True:
        snap = source.poll()
        if snap is not None and want(snap):
            return snap
        assert time.monotonic() < deadline, f"no such snapshot; last: {snap}"
        time.sleep(0.05)


def test_discovery_follows_the_config_map_and_ready_pods(
    cluster: LocalCluster, ns: str, request: pytest.FixtureRequest
) -> None:
    core = client.CoreV1Api(config.new_client_from_config(str(cluster.kubeconfig)))
    pods = {
        "engine-1": (pod("engine-1", "r1"), "127.0.0.11", True),  # named port 8001
        "engine-2": (pod("engine-2", "r2"), "127.0.0.12", True),  # no named port: 8000
        "engine-3": (pod("engine-3", "r1"), "127.0.0.14", False),  # not ready
        "engine-4": (pod("engine-4", "r1"), None, True),  # no IP yet
        "shadow-1": (pod("shadow-1", "rs", component="shadow"), "127.0.0.13", True),
        "other-1": (pod("other-1", "r1", service="other"), "127.0.0.15", True),
    }
    for doc, ip, ready in pods.values():
        core.create_namespaced_pod(ns, doc)
        core.patch_namespaced_pod_status(doc["metadata"]["name"], ns, kubelet_status(ip, ready))
    source = KubernetesSource(ns, SERVICE, str(cluster.kubeconfig))
    request.addfinalizer(source.stop)

    # No ConfigMap yet: every revision with ready engine pods, evenly; no shadow.
    snap = changed(source, lambda s: len(s.endpoints) == 3)
    assert snap.config.revisions == (Revision("r1", 1), Revision("r2", 1))
    assert snap.config.shadow is None
    want = (
        Endpoint("http://127.0.0.11:8001", "r1"),
        Endpoint("http://127.0.0.12:8000", "r2"),
        Endpoint("http://127.0.0.13:8000", "rs"),  # shadow pods are found by their own selector
    )
    assert snap.endpoints == want

    # The operator's table.
    routes = {
        "service": SERVICE,
        "revisions": [
            {"name": "r1", "weight": 75, "role": "stable"},
            {"name": "r2", "weight": 25, "role": "canary"},
        ],
        "shadow": {"revision": "rs", "mirrorPercent": 10.0, "maxRps": None},
    }
    core.create_namespaced_config_map(ns, routes_config_map(json.dumps(routes)))
    snap = changed(source, lambda s: s.config.shadow is not None)
    assert snap.config.revisions == (Revision("r1", 75, "stable"), Revision("r2", 25, "canary"))
    assert snap.config.shadow == Shadow("rs", 10.0, None)
    assert snap.endpoints == want

    # A pod turning NotReady, and one being deleted (a finalizer holds it, still Ready, as a
    # terminating pod is during its grace period), drop out; one turning Ready comes in.
    core.patch_namespaced_pod_status("engine-1", ns, kubelet_status("127.0.0.11", False))
    core.patch_namespaced_pod_status("engine-3", ns, kubelet_status("127.0.0.14", True))
    core.patch_namespaced_pod("engine-2", ns, {"metadata": {"finalizers": ["kvpilot.io/test"]}})
    core.delete_namespaced_pod("engine-2", ns)
    assert core.read_namespaced_pod("engine-2", ns).metadata.deletion_timestamp is not None
    snap = changed(source, lambda s: len(s.endpoints) == 2)
    assert snap.endpoints == (
        Endpoint("http://127.0.0.13:8000", "rs"),
        Endpoint("http://127.0.0.14:8000", "r1"),
    )
    core.patch_namespaced_pod("engine-2", ns, {"metadata": {"finalizers": None}})

    # A broken table is an error (the router keeps its last good routes), not empty routes.
    core.patch_namespaced_config_map(f"{SERVICE}-router", ns, {"data": {"routes.json": "{"}})
    with pytest.raises(ValueError, match="route config"):
        changed(source, lambda s: False)

    # At rest, the routes come from the watches: polls make no request (one list and one watch
    # per kind, and a new watch per watch timeout, 5 minutes by default).
    before = source.requests
    time.sleep(2)
    for _ in range(20):
        assert source.poll() is None
    assert source.requests == before == 4


def test_the_router_role_allows_its_watches(
    cluster: LocalCluster, ns: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Discovery as the router's own ServiceAccount, with the Role the operator renders: the
    watches of its one ConfigMap (by name) and the pods are allowed, and nothing more is."""
    from kvpilot_operator.api.policies import resolve_spec
    from kvpilot_operator.api.types import LLMService
    from kvpilot_operator.controller.manifests import render

    spec = {"model": {"source": {"path": "m"}}}
    svc = LLMService.model_validate({"metadata": {"name": SERVICE, "namespace": ns}, "spec": spec})
    wanted = {"ServiceAccount", "Role", "RoleBinding", "ConfigMap"}
    for obj in render(svc, resolve_spec(svc.spec, None)):
        if obj["kind"] in wanted:
            cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(obj))
    kubeconfig = service_account_kubeconfig(
        cluster, ns, f"{SERVICE}-router", tmp_path / "router.kubeconfig"
    )
    source = KubernetesSource(ns, SERVICE, str(kubeconfig))
    request.addfinalizer(source.stop)
    snap = changed(source, lambda s: s.config.service == SERVICE)
    assert snap.endpoints == ()
    as_router = client.CoreV1Api(config.new_client_from_config(str(kubeconfig)))
    with pytest.raises(client.exceptions.ApiException) as refused:
        as_router.list_namespaced_config_map(ns)  # not by name: every ConfigMap
    assert refused.value.status == 403
