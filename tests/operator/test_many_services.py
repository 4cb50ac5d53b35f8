"""Many LLMServices at once, the autoscaler and rollouts on, on the local control plane.

The autoscaler and rollout loops are one operator-wide sweep each over an index of LLMServices,
not a kopf daemon (a worker thread held for the service's life) per service: a dozen services must
not starve the reconciles, and no finalizer may be put on an LLMService, or deleting one (or its
namespace) hangs while the operator is down.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from kvpilot_operator.local.cluster import LocalCluster
from kvpilot_operator.local.prometheus import LocalPrometheus

from tests.support.kube import apply, condition, get, running_operator, service_doc, wait_for

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
N = 12  # more than kopf's 8 worker threads


def test_a_dozen_services_reconcile_carry_no_finalizer_and_delete_with_the_operator_down(
    cluster: LocalCluster, prometheus: LocalPrometheus, ns: str, tmp_path: Path
) -> None:
    # kubectl 1.20 does not know the CEL rules' field (x-kubernetes-validations), its server does.
    cluster.kubectl("apply", "--validate=false", "-f", str(ROOT / "crds"))
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/servingpolicies.kvpilot.io"
    )
    cluster.kubectl("apply", "-f", str(ROOT / "policies"))
    names = [f"svc-{i}" for i in range(N)]
    canary = {"canary": {"steps": [50, 100], "stepSeconds": 30}}
    docs = [
        service_doc(
            name, policy="interactive-chat", replicas=0, **({"rollout": canary} if i % 2 else {})
        )
        for i, name in enumerate(names)
    ]
    # One as an operator with daemons left it: kopf's finalizer on it, which this one removes.
    legacy = service_doc("legacy", policy="interactive-chat", replicas=0)
    legacy["metadata"]["finalizers"] = ["kopf.zalando.org/KopfFinalizerMarker"]
    apply(cluster, legacy, ns)
    with running_operator(
        cluster, tmp_path / "operator.log",
        "--prometheus-url", prometheus.url, "--autoscale-interval", "1", "--rollout-interval", "1",
    ):  # fmt: skip
        started = time.monotonic()
        apply(cluster, {"apiVersion": "v1", "kind": "List", "items": docs}, ns)

        def engines() -> list[str]:
            out = cluster.kubectl("get", "deployments", "-n", ns, "-o", "json").stdout
            return [d["metadata"]["name"] for d in json.loads(out)["items"]]

        wait_for(
            f"{N} engine Deployments",
            lambda: {f"{n}-engine" for n in [*names, "legacy"]} <= set(engines()),
            timeout=60,
        )
        print(f"{N} LLMServices reconciled in {time.monotonic() - started:.1f} s")
        # Their loops are running now: one more service is still reconciled at once.
        started = time.monotonic()
        apply(cluster, service_doc("latecomer", policy="interactive-chat", replicas=0), ns)
        wait_for("the latecomer's Deployment", lambda: "latecomer-engine" in engines(), timeout=10)
        print(f"a service applied after them reconciled in {time.monotonic() - started:.1f} s")
        names += ["latecomer", "legacy"]

        # The autoscaler's sweep reaches every one of them (no Prometheus data: it holds, and
        # says so in ScalingActive).
        wait_for(
            "ScalingActive on every service",
            lambda: all(
                condition(get(cluster, "llmservice", n, ns), "ScalingActive") for n in names
            ),
            timeout=30,
        )

        def warned() -> set[str]:
            out = cluster.kubectl("get", "events", "-n", ns, "-o", "json").stdout
            items = json.loads(out)["items"]
            return {e["involvedObject"]["name"] for e in items if e["reason"] == "NoMetrics"}

        # ... and its events, posted from the loop's own threads (controller.events).
        wait_for("the autoscaler's NoMetrics event on each", lambda: set(names) <= warned())
        for name in names:
            svc = get(cluster, "llmservice", name, ns)
            assert svc is not None
            assert not svc["metadata"].get("finalizers"), (name, svc["metadata"]["finalizers"])

    # The operator is stopped: nothing could remove a finalizer now.
    started = time.monotonic()
    cluster.kubectl("delete", "llmservice", names[0], "-n", ns, "--timeout=20s")
    assert get(cluster, "llmservice", names[0], ns) is None
    print(f"deleted with the operator down in {time.monotonic() - started:.1f} s")
