"""The operator against a real kube-apiserver, controller-manager and etcd (tests/operator/
conftest.py), driven with Debian's kubectl 1.20, as a user would.

There is no kubelet here: engine pods are created by the ReplicaSet controller but never run.
Where a test needs a pod to be ready, it writes the pod's status as a kubelet would (and says so).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kvpilot_operator.local.cluster import LocalCluster

from tests.support.invalid_specs import CASES, case_doc
from tests.support.kube import (
    Operator,
    apply,
    condition,
    get,
    running_and_ready,
    service_doc,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def operator(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    # kubectl 1.20 does not know the CEL rules' field (x-kubernetes-validations), its server does.
    cluster.kubectl("apply", "--validate=false", "-f", str(ROOT / "crds"))
    cluster.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/llmservices.kvpilot.io",
        "crd/servingpolicies.kvpilot.io",
    )
    cluster.kubectl("apply", "-f", str(ROOT / "policies"))
    op = Operator(cluster, tmp_path_factory.mktemp("operator") / "operator.log")
    op.start()
    try:
        yield op
    finally:
        code = op.stop()
        print(op.log_text()[-4000:])
        assert code in (0, -signal.SIGTERM), f"operator exited {code}"


def owned(cluster: LocalCluster, name: str, ns: str) -> dict[str, dict | None]:
    return {
        "Deployment": get(cluster, "deployment", f"{name}-engine", ns),
        "Service": get(cluster, "service", name, ns),
        "PodDisruptionBudget": get(cluster, "pdb", f"{name}-engine", ns),
        "NetworkPolicy": get(cluster, "networkpolicy", f"{name}-engine", ns),
    }


def all_owned(cluster: LocalCluster, name: str, ns: str) -> dict[str, dict]:
    objs = owned(cluster, name, ns)
    return objs if all(objs.values()) else {}  # type: ignore[return-value]


def engine_args(deployment: dict) -> list[str]:
    return deployment["spec"]["template"]["spec"]["containers"][0]["args"]


def engine_pods(cluster: LocalCluster, ns: str, selector: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", "pods", "-n", ns, "-l", selector, "-o", "json").stdout
    return json.loads(out)["items"]


def act_as_kubelet(cluster: LocalCluster, ns: str, selector: str, ready: int) -> None:
    """Mark `ready` of the engine pods Running and Ready, as a kubelet would report them."""
    pods = engine_pods(cluster, ns, selector)
    from kubernetes import client, config

    api = client.CoreV1Api(config.new_client_from_config(str(cluster.kubeconfig)))
    for pod in pods[:ready]:
        api.patch_namespaced_pod_status(pod["metadata"]["name"], ns, running_and_ready())


# --- 1. apply, update, delete ----------------------------------------------------------------


def test_apply_update_delete(cluster: LocalCluster, operator: Operator, ns: str) -> None:
    sample = yaml.safe_load((ROOT / "docs/examples/smollm2-chat.yaml").read_text())
    apply(cluster, sample, ns)
    name = sample["metadata"]["name"]
    objs = wait_for(
        "Deployment, Service, PDB and NetworkPolicy", lambda: all_owned(cluster, name, ns)
    )
    svc = get(cluster, "llmservice", name, ns)
    assert svc is not None
    for obj in objs.values():
        (ref,) = obj["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"]) == (
            "LLMService",
            name,
            svc["metadata"]["uid"],
        )
        assert ref["controller"] is True
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kvpilot-operator"
        managers = {
            m["manager"] for m in obj["metadata"]["managedFields"] if m["operation"] == "Apply"
        }
        assert managers == {"kvpilot-operator"}
    dep = objs["Deployment"]
    args = engine_args(dep)
    assert args[0] == "smollm2" and "--max-model-len" in args
    assert args[args.index("--max-num-seqs") + 1] == "128"  # from the interactive-chat policy
    assert "--quantization" not in args  # the service's `none` wins over the policy's int4
    pod = dep["spec"]["template"]["spec"]
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["containers"][0]["resources"]["requests"] == {"cpu": "2", "memory": "4Gi"}
    assert objs["Service"]["spec"]["ports"][0]["port"] == 8000
    assert objs["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    assert objs["NetworkPolicy"]["spec"]["policyTypes"] == ["Ingress"]

    status = wait_for("status", lambda: (get(cluster, "llmservice", name, ns) or {}).get("status"))
    assert status["observedGeneration"] == svc["metadata"]["generation"]
    assert status["endpoint"] == f"http://{name}.{ns}.svc.cluster.local:8000/v1"
    assert (
        status["selector"]
        == "kvpilot.io/llmservice=smollm2-chat,app.kubernetes.io/component=engine"
    )
    assert condition({"status": status}, "Degraded")["status"] == "False"
    events = cluster.kubectl("get", "events", "-n", ns, "-o", "json").stdout
    assert "created Deployment" in events

    # A spec change reaches the Deployment.
    sample["spec"]["engine"] = {"maxNumSeqs": 32}
    apply(cluster, sample, ns)

    def updated() -> bool:
        dep = get(cluster, "deployment", f"{name}-engine", ns) or {}
        return "32" in engine_args(dep)

    wait_for("updated engine args", updated)
    gen = get(cluster, "llmservice", name, ns)["metadata"]["generation"]  # type: ignore[index]
    wait_for(
        "observedGeneration",
        lambda: (
            (get(cluster, "llmservice", name, ns) or {}).get("status", {}).get("observedGeneration")
            == gen
        ),
    )

    # `kubectl scale` goes through the scale subresource; the operator propagates it.
    cluster.kubectl("scale", "llmservice", name, "-n", ns, "--replicas=3")
    wait_for(
        "3 replicas",
        lambda: (
            (get(cluster, "deployment", f"{name}-engine", ns) or {}).get("spec", {}).get("replicas")
            == 3
        ),
    )
    scale = json.loads(
        cluster.kubectl(
            "get", "--raw", f"/apis/kvpilot.io/v1alpha1/namespaces/{ns}/llmservices/{name}/scale"
        ).stdout
    )
    assert scale["spec"]["replicas"] == 3
    assert scale["status"]["selector"] == status["selector"]

    # Deleting the LLMService garbage-collects what it owns.
    cluster.kubectl("delete", "llmservice", name, "-n", ns)
    wait_for("garbage collection", lambda: not any(owned(cluster, name, ns).values()), 60)
    assert operator.alive()


# --- 2. invalid LLMServices are rejected by the API server -----------------------------------

# (label, spec, the field the API server's message must name)
INVALID = [
    ("quantization", {"quantization": "int3"}, "spec.quantization"),
    ("block size", {"engine": {"blockSize": 12}}, "spec.engine.blockSize"),
    ("max replicas", {"scaling": {"maxReplicas": 0}}, "spec.scaling.maxReplicas"),
    ("negative replicas", {"replicas": -1}, "spec.replicas"),
    ("tensor", {"parallelism": {"tensor": 0}}, "spec.parallelism.tensor"),
    (
        "percentile",
        {"slo": {"ttft": {"percentile": 97, "targetMs": 100}}},
        "spec.slo.ttft.percentile",
    ),
    ("no target", {"slo": {"tpot": {"percentile": 95}}}, "spec.slo.tpot.targetMs"),
    ("window", {"slo": {"window": "5 minutes"}}, "spec.slo.window"),
    ("policy name", {"policy": "Interactive_Chat"}, "spec.policy"),
    ("kv memory", {"engine": {"kvCacheMemory": "lots"}}, "spec.engine.kvCacheMemory"),
    ("dtype", {"model": {"source": {"path": "m"}, "dtype": "int8"}}, "spec.model.dtype"),
    ("no source", {"model": {"source": {}}}, "spec.model.source"),
    ("gpu count", {"resources": {"gpu": {"count": "two"}}}, "spec.resources.gpu.count"),
    ("scheduling", {"engine": {"schedulingPolicy": "lifo"}}, "spec.engine.schedulingPolicy"),
    ("canary step", {"rollout": {"canary": {"steps": [5, 150]}}}, "spec.rollout.canary.steps"),
]


def test_invalid_llmservices_are_rejected(
    cluster: LocalCluster, operator: Operator, ns: str
) -> None:
    # --validate=false: kubectl sends the object as is, so the API server's schema rejects it.
    for label, spec, field in INVALID:
        doc = service_doc("bad-" + label.replace(" ", "-"), **spec)
        proc = cluster.kubectl(
            "apply", "--validate=false", "-n", ns, "-f", "-", input=yaml.safe_dump(doc), check=False
        )
        assert proc.returncode != 0, f"{label}: accepted"
        assert "is invalid" in proc.stderr and field in proc.stderr, f"{label}: {proc.stderr}"
    no_model = {
        "apiVersion": "kvpilot.io/v1alpha1",
        "kind": "LLMService",
        "metadata": {"name": "bad-no-model"},
        "spec": {"policy": "copilot"},
    }
    proc = cluster.kubectl(
        "apply",
        "--validate=false",
        "-n",
        ns,
        "-f",
        "-",
        input=yaml.safe_dump(no_model),
        check=False,
    )
    assert proc.returncode != 0 and "spec.model" in proc.stderr, proc.stderr
    # Unknown fields: the server prunes them (Kubernetes 1.20 has no server-side field
    # validation), kubectl's own validation against the published schema rejects them.
    typo = service_doc("bad-typo", modle={"source": {"path": "m"}})
    proc = apply(cluster, typo, ns, check=False)
    assert proc.returncode != 0 and 'unknown field "modle"' in proc.stderr, proc.stderr
    # With the CRD's schema in kubectl's hands, client-side messages name the field too.
    proc = apply(cluster, service_doc("bad-client", quantization="int3"), ns, check=False)
    assert proc.returncode != 0 and "quantization" in proc.stderr, proc.stderr
    listed = json.loads(cluster.kubectl("get", "llmservices", "-n", ns, "-o", "json").stdout)
    assert listed["items"] == []


def test_every_invalid_spec_is_refused_naming_its_field(
    cluster: LocalCluster, operator: Operator, ns: str
) -> None:
    """tests/support/invalid_specs.py against the real API server and operator: each broken
    LLMService is refused at apply (schema) or reported Degraded by the operator, naming its
    field either way, and no engine Deployment (nor any other object) is created for any."""
    admitted = {}
    for i, (label, fields, field) in enumerate(CASES):
        doc = case_doc(i, fields)
        proc = cluster.kubectl(
            "apply", "--validate=false", "-n", ns, "-f", "-", input=yaml.safe_dump(doc),
            check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            assert "is invalid" in proc.stderr and field in proc.stderr, f"{label}: {proc.stderr}"
        else:
            admitted[doc["metadata"]["name"]] = (label, field)
    assert admitted, "the operator's own checks were not reached"

    def degraded() -> dict[str, dict]:
        out = {}
        for name in admitted:
            cond = condition(get(cluster, "llmservice", name, ns), "Degraded")
            if cond.get("status") == "True":
                out[name] = cond
        return out if len(out) == len(admitted) else {}

    conds = wait_for("every admitted broken service Degraded", degraded, timeout=60)
    for name, cond in conds.items():
        label, field = admitted[name]
        assert field in cond["message"], f"{label}: {cond}"
    created = json.loads(
        cluster.kubectl(
            "get", "deployments,services,configmaps,poddisruptionbudgets", "-n", ns, "-o", "json"
        ).stdout
    )["items"]
    assert [o["metadata"]["name"] for o in created if o["kind"] != "ConfigMap" or
            o["metadata"]["name"] != "kube-root-ca.crt"] == []  # fmt: skip
    print(f"{len(CASES)} cases: {len(CASES) - len(admitted)} refused at apply, "
          f"{len(admitted)} Degraded by the operator")  # fmt: skip


# --- an admitted spec the operator cannot serve: Degraded, not a crash loop -----------------


def test_unservable_specs_are_degraded(cluster: LocalCluster, operator: Operator, ns: str) -> None:
    apply(cluster, service_doc("minmax", scaling={"minReplicas": 4, "maxReplicas": 2}), ns)
    apply(cluster, service_doc("nopolicy", policy="does-not-exist-yet"), ns)

    def degraded(name: str) -> dict:
        cond = condition(get(cluster, "llmservice", name, ns), "Degraded")
        return cond if cond.get("status") == "True" else {}

    cond = wait_for("Degraded minmax", lambda: degraded("minmax"))
    assert cond["reason"] == "InvalidSpec" and "spec.scaling: minReplicas (4)" in cond["message"]
    cond = wait_for("Degraded nopolicy", lambda: degraded("nopolicy"))
    assert cond["reason"] == "PolicyNotFound"
    assert get(cluster, "deployment", "minmax-engine", ns) is None
    events = cluster.kubectl("get", "events", "-n", ns, "-o", "json").stdout
    assert "InvalidSpec" in events and "PolicyNotFound" in events

    # The policy appears: its services are reconciled without touching them.
    policy = {
        "apiVersion": "kvpilot.io/v1alpha1",
        "kind": "ServingPolicy",
        "metadata": {"name": "does-not-exist-yet"},
        "spec": {"engine": {"maxNumSeqs": 3}},
    }
    apply(cluster, policy)
    dep = wait_for(
        "Deployment after the policy appeared",
        lambda: get(cluster, "deployment", "nopolicy-engine", ns),
    )
    assert engine_args(dep)[engine_args(dep).index("--max-num-seqs") + 1] == "3"
    wait_for(
        "Degraded cleared",
        lambda: (
            condition(get(cluster, "llmservice", "nopolicy", ns), "Degraded").get("status")
            == "False"
        ),
    )
    # A policy change re-reconciles the services that name it.
    policy["spec"]["engine"]["maxNumSeqs"] = 5
    apply(cluster, policy)
    wait_for(
        "policy change propagated",
        lambda: (
            "5"
            in engine_args(
                get(cluster, "deployment", "nopolicy-engine", ns)
                or {"spec": {"template": {"spec": {"containers": [{"args": []}]}}}}
            )
        ),
    )
    # Fixing the spec clears Degraded.
    apply(cluster, service_doc("minmax", scaling={"minReplicas": 1, "maxReplicas": 2}), ns)
    wait_for("minmax served", lambda: get(cluster, "deployment", "minmax-engine", ns))
    cluster.kubectl("delete", "servingpolicy", "does-not-exist-yet")
    assert operator.alive()


# --- 3. drift correction and restart without churn -------------------------------------------


def resource_versions(cluster: LocalCluster, name: str, ns: str) -> dict[str, str]:
    objs = {
        **owned(cluster, name, ns),
        "LLMService": get(cluster, "llmservice", name, ns),
        **{
            kind: get(cluster, kind, f"{name}-router", ns)
            for kind in ("deployment", "configmap", "serviceaccount", "role", "rolebinding")
        },
    }
    return {k: v["metadata"]["resourceVersion"] for k, v in objs.items() if v}


def test_drift_is_corrected_and_restart_changes_nothing(
    cluster: LocalCluster, operator: Operator, ns: str
) -> None:
    apply(cluster, service_doc("drift", policy="copilot", quantization="none"), ns)
    first = wait_for("owned objects", lambda: all_owned(cluster, "drift", ns))

    # Deleting the Service by hand brings it back.
    cluster.kubectl("delete", "service", "drift", "-n", ns)
    back = wait_for("Service restored", lambda: get(cluster, "service", "drift", ns))
    assert back["metadata"]["uid"] != first["Service"]["metadata"]["uid"]
    # Scaling the Deployment behind the LLMService's back is undone (one writer of replicas).
    cluster.kubectl("scale", "deployment", "drift-engine", "-n", ns, "--replicas=7")
    wait_for(
        "replicas restored",
        lambda: (
            (get(cluster, "deployment", "drift-engine", ns) or {}).get("spec", {}).get("replicas")
            == 2
        ),
    )
    # A PDB deleted by hand comes back too, and so do the router's routes and RBAC.
    cluster.kubectl("delete", "pdb", "drift-engine", "-n", ns)
    wait_for("PDB restored", lambda: get(cluster, "pdb", "drift-engine", ns))
    for kind in ("configmap", "role", "rolebinding", "serviceaccount"):
        cluster.kubectl("delete", kind, "drift-router", "-n", ns)
        wait_for(f"{kind} restored", lambda k=kind: get(cluster, k, "drift-router", ns))
    # An edit of a field the operator set is undone (the operator's fields moved to another
    # manager); a label of someone else's is no drift, and stays.
    routes = (get(cluster, "configmap", "drift-router", ns) or {})["data"]
    cluster.kubectl(
        "patch", "configmap", "drift-router", "-n", ns, "--type=merge",
        "-p", json.dumps({"data": dict.fromkeys(routes, "{}")}),
    )  # fmt: skip
    cluster.kubectl("label", "configmap", "drift-router", "-n", ns, "team=platform")
    wait_for(
        "routes restored",
        lambda: (get(cluster, "configmap", "drift-router", ns) or {}).get("data") == routes,
    )
    edited = get(cluster, "configmap", "drift-router", ns) or {}
    assert edited["metadata"]["labels"]["team"] == "platform"

    # Let the controllers settle, then restart the operator: nothing changes.
    def settled() -> dict[str, str] | None:
        before = resource_versions(cluster, "drift", ns)
        time.sleep(2)
        return before if resource_versions(cluster, "drift", ns) == before else None

    before = wait_for("settled", settled)
    lines = operator.log_text().count("\n")
    operator.stop()
    operator.start()
    wait_for(
        "operator resumed",
        lambda: "on_llmservice" in "\n".join(operator.log_text().splitlines()[lines:]) or None,
        60,
    )
    time.sleep(3)
    assert resource_versions(cluster, "drift", ns) == before
    assert operator.alive()


# --- 4. printer columns and status conditions follow the Deployment ---------------------------


def test_printer_columns_and_conditions_follow_the_deployment(
    cluster: LocalCluster, operator: Operator, ns: str
) -> None:
    apply(
        cluster,
        service_doc("ready", model={"source": {"path": "smollm2"}, "servedName": "smol"}),
        ns,
    )
    status = wait_for(
        "status", lambda: (get(cluster, "llmservice", "ready", ns) or {}).get("status")
    )
    assert condition({"status": status}, "Ready")["status"] == "False"
    assert condition({"status": status}, "Ready")["reason"] in {
        "NoReadyReplicas",
        "DeploymentNotFound",
    }
    # The ReplicaSet controller makes the pods; no kubelet runs them, so report them ready
    # ourselves: the engine first (not Ready yet: no router to reach it), then the router.
    wait_for("engine pod", lambda: engine_pods(cluster, ns, status["selector"]))
    act_as_kubelet(cluster, ns, status["selector"], ready=1)
    wait_for(
        "RouterUnavailable",
        lambda: condition(get(cluster, "llmservice", "ready", ns), "Ready").get("reason")
        == "RouterUnavailable",
    )
    routers = "kvpilot.io/llmservice=ready,app.kubernetes.io/component=router"
    wait_for("router pod", lambda: engine_pods(cluster, ns, routers))
    act_as_kubelet(cluster, ns, routers, ready=1)
    svc = wait_for(
        "Ready=True",
        lambda: (lambda s: s if condition(s, "Ready").get("status") == "True" else None)(
            get(cluster, "llmservice", "ready", ns)
        ),
    )
    assert condition(svc, "Ready")["reason"] == "MinimumReplicasAvailable"
    assert condition(svc, "Progressing")["status"] == "False"
    assert svc["status"]["readyReplicas"] == 1 and svc["status"]["replicas"] == 1

    table = cluster.kubectl("get", "llmservices", "-n", ns).stdout.splitlines()
    assert table[0].split() == ["NAME", "MODEL", "REPLICAS", "READY", "TTFT-P95", "SLO-MET", "AGE"]
    assert table[1].split()[:4] == ["ready", "smol", "1", "1"]

    # Scaling up: Progressing until the new replica is ready.
    cluster.kubectl("scale", "llmservice", "ready", "-n", ns, "--replicas=2")
    wait_for(
        "Progressing=True",
        lambda: (
            condition(get(cluster, "llmservice", "ready", ns), "Progressing").get("status")
            == "True"
        ),
    )
    wait_for("second pod", lambda: len(engine_pods(cluster, ns, status["selector"])) == 2)
    act_as_kubelet(cluster, ns, status["selector"], ready=2)
    wait_for(
        "2 ready",
        lambda: (
            (get(cluster, "llmservice", "ready", ns) or {}).get("status", {}).get("readyReplicas")
            == 2
        ),
    )
    wait_for(
        "Progressing=False",
        lambda: (
            condition(get(cluster, "llmservice", "ready", ns), "Progressing").get("status")
            == "False"
        ),
    )
