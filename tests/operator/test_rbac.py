"""The operator under the chart's own RBAC, not as a cluster admin: the ServiceAccount, ClusterRole,
Roles and bindings `helm template` renders are applied to the real API server and `kvpilot
operator` runs with that account's token, watching one namespace (Roles there only) or all of
them (the ClusterRole). An LLMService with a policy is reconciled, the autoscaler (a Prometheus
that does not answer) writes its status and events, the Lease is taken, and no request of the
operator's is forbidden: the grants are enough, and the chart's test (test_chart.py) checks
they are no more."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from kvpilot_operator.local.cluster import LocalCluster
from kvpilot_operator.local.procs import free_ports

from tests.support.helm import template
from tests.support.kube import (
    ROOT,
    Operator,
    apply,
    condition,
    get,
    service_account_kubeconfig,
    service_doc,
    wait_for,
)

pytestmark = pytest.mark.slow

# How RBAC words a refusal, in kopf's log and (quotes escaped) in a JSON Status body.
RBAC_DENIAL = re.compile(r'forbidden: User \\?"system:serviceaccount:')
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


def test_operator_rbac_namespaced(
    cluster: LocalCluster, helm: str, ns: str, tmp_path: Path
) -> None:
    under_the_charts_rbac(cluster, helm, ns, tmp_path, "namespaced")


def test_operator_rbac_clusterwide(
    cluster: LocalCluster, helm: str, ns: str, tmp_path: Path
) -> None:
    under_the_charts_rbac(cluster, helm, ns, tmp_path, "clusterwide")


def under_the_charts_rbac(
    cluster: LocalCluster, helm: str, ns: str, tmp_path: Path, scope: str
) -> None:
    home = f"{ns[:50]}-op"  # the release's namespace: the operator's account and its Lease
    cluster.kubectl("create", "namespace", home)
    cluster.kubectl("apply", "--validate=false", "-f", str(ROOT / "crds"))
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/llmservices.kvpilot.io"
    )
    cluster.kubectl("apply", "-f", str(ROOT / "policies"))
    watch = ["--set", f"operator.watchNamespaces={{{ns}}}"] if scope == "namespaced" else []
    docs = [d for d in template(helm, "--namespace", home, *watch) if d["kind"] in RBAC_KINDS]
    roles = [d for d in docs if d["kind"] == "Role"]
    assert (ns in {r["metadata"]["namespace"] for r in roles}) == (scope == "namespaced")
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    account = next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]["name"]
    kubeconfig = service_account_kubeconfig(cluster, home, account, tmp_path / "sa.kubeconfig")

    args = ["--leader-election-namespace", home, "--autoscale-interval", "2"]
    args += ["--prometheus-url", f"http://127.0.0.1:{free_ports(1)[0]}"]  # nobody answers
    if scope == "namespaced":
        args += ["--namespace", ns]
    op = Operator(cluster, tmp_path / "operator.log", tuple(args), kubeconfig)
    op.start()
    try:
        apply(cluster, service_doc("chat", policy="interactive-chat"), ns)
        wait_for("the engine Deployment", lambda: get(cluster, "deployment", "chat-engine", ns))

        def held() -> dict | None:
            svc = get(cluster, "llmservice", "chat", ns) or {}
            observed = (svc.get("status") or {}).get("observedGeneration") == 1
            return svc if observed and condition(svc, "ScalingActive") else None

        svc = wait_for("status from the reconcile and the autoscaler", held, timeout=60)
        assert condition(svc, "ScalingActive")["status"] == "False"  # no Prometheus: holds
        lease = get(cluster, "lease", "kvpilot-operator", home)
        assert lease is not None and lease["spec"]["holderIdentity"]
        assert op.alive()
    finally:
        op.stop()
        cluster.kubectl("delete", "namespace", home, "--wait=false")
    # Only RBAC's denials count: a 403 for writing into a namespace another test is deleting
    # (NamespaceTerminating) is the API server's, not the grants', and the cluster-wide operator
    # sees every test's namespaces.
    denials = [line for line in op.log_text().splitlines() if RBAC_DENIAL.search(line)]
    assert not denials, "\n".join(denials[:20])
