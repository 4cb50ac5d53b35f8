"""The local control plane is a real one: the apiserver serves, the controller-manager's
controllers (Deployment, garbage collector) act, and stop() leaves no process behind."""

from __future__ import annotations

import json
import os

import pytest
from kvpilot_operator.local.cluster import LocalCluster

from tests.support.kube import wait_for

pytestmark = pytest.mark.slow  # every test here starts processes


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_apiserver_answers(cluster: LocalCluster) -> None:
    version = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"].startswith("v1.20.")
    ns = json.loads(cluster.kubectl("get", "ns", "default", "-o", "json").stdout)
    assert ns["status"]["phase"] == "Active"
    assert cluster.server.startswith("https://127.0.0.1:")
    assert cluster.env()["KUBECONFIG"] == str(cluster.kubeconfig)


DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata:
  name: lc-deploy
  namespace: default
spec:
  replicas: 1
  selector:
    matchLabels: {app: lc-deploy}
  template:
    metadata:
      labels: {app: lc-deploy}
    spec:
      containers:
        - name: c
          image: example.invalid/none:0
"""


def test_deployment_gets_replicaset(cluster: LocalCluster) -> None:
    cluster.kubectl("apply", "-f", "-", input=DEPLOYMENT)
    try:

        def replicaset_with_pod() -> bool:
            out = cluster.kubectl("get", "rs,pods", "-l", "app=lc-deploy", "-o", "json").stdout
            kinds = [item["kind"] for item in json.loads(out)["items"]]
            # A Pod, not just a ReplicaSet: the ServiceAccount admission plugin let it in.
            return "ReplicaSet" in kinds and "Pod" in kinds

        wait_for("the Deployment's ReplicaSet and Pod", replicaset_with_pod)
    finally:
        cluster.kubectl("delete", "deployment", "lc-deploy", "--wait=false", check=False)


def test_garbage_collector_deletes_dependents(cluster: LocalCluster) -> None:
    cluster.kubectl("create", "configmap", "lc-owner", "--from-literal=k=v")
    uid = cluster.kubectl("get", "configmap", "lc-owner", "-o", "jsonpath={.metadata.uid}").stdout
    dependent = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "lc-dependent",
            "namespace": "default",
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "ConfigMap", "name": "lc-owner", "uid": uid}
            ],
        },
        "data": {"k": "v"},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(dependent))
    cluster.kubectl("delete", "configmap", "lc-owner")

    def dependent_gone() -> bool:
        got = cluster.kubectl("get", "configmap", "lc-dependent", check=False)
        return got.returncode != 0 and "NotFound" in got.stderr

    wait_for("the garbage collector to delete lc-dependent", dependent_gone, timeout=30.0)


def test_second_cluster_and_stop_leaves_no_processes(cluster: LocalCluster) -> None:
    # A cluster of its own, next to the shared one: two run at once, and stopping this one must
    # neither leave processes behind nor disturb the other.
    c = LocalCluster()
    with c:
        assert c.server != cluster.server
        pids = c.pids
        assert len(pids) == 4
        assert not any(gone(pid) for pid in pids)
        assert c.kubectl("get", "sa", "default", "-o", "name").stdout.strip() == (
            "serviceaccount/default"
        )
        workdir = c.workdir
    assert all(gone(pid) for pid in pids)
    assert workdir is not None and not workdir.exists()
    c.stop()  # idempotent
    assert cluster.exited() == []
    cluster.kubectl("get", "ns", "default")


CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.lctest.kvpilot.io"},
    "spec": {
        "group": "lctest.kvpilot.io",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                        },
                    }
                },
            }
        ],
    },
}


def test_custom_resources_round_trip(cluster: LocalCluster) -> None:
    # Built with Go >= 1.18, the vendored reflect2 1.0.1 made the apiserver segfault on the first
    # custom resource it decoded; the operator's CRDs would take the whole cluster down.
    cluster.kubectl("apply", "-f", "-", input=json.dumps(CRD))
    try:
        cluster.kubectl(
            "wait", "--for=condition=Established", "crd/widgets.lctest.kvpilot.io", "--timeout=30s"
        )
        widget = {
            "apiVersion": "lctest.kvpilot.io/v1",
            "kind": "Widget",
            "metadata": {"name": "w", "namespace": "default", "labels": {"a": "b", "c": "d"}},
            "spec": {"size": 3, "tags": {"x": "1", "y": "2"}},
        }
        cluster.kubectl("apply", "-f", "-", input=json.dumps(widget))
        got = json.loads(cluster.kubectl("get", "widget", "w", "-o", "json").stdout)
        assert got["spec"] == widget["spec"]
        assert cluster.exited() == []
    finally:
        cluster.kubectl("delete", "crd", "widgets.lctest.kvpilot.io", "--wait=false", check=False)
