"""Canary and shadow rollouts end to end, on loopback: the real API server and `kvpilot
operator`, real SmolLM2 engines and a real router run as pods by the node agent (this machine's
kubelet stand-in), a real Prometheus scraping the router, and the official `openai` client as
the users.

A canary made slow with the engine's fault-injection flag is rolled back on its own; a healthy
one walks its steps and is promoted; status.canary and the events tell the story, and the users
see no errors through either. A shadow with the primary's settings agrees on every greedy
request, and status.shadow and ShadowHealthy say so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kvpilot_operator.local.cluster import LocalCluster
from kvpilot_operator.local.nodeagent import NodeAgent
from kvpilot_operator.local.prometheus import LocalPrometheus

from tests.support.kube import (
    Operator,
    Users,
    apply,
    condition,
    events,
    get,
    running_operator,
    service_doc,
    wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rollout_operator(
    cluster: LocalCluster, prometheus: LocalPrometheus, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Operator]:
    with running_operator(
        cluster,
        tmp_path_factory.mktemp("rollout") / "operator.log",
        "--prometheus-url", prometheus.url, "--rollout-interval", "1",
        "--autoscale-interval", "5",
    ) as op:  # fmt: skip
        yield op


@pytest.fixture
def agent(cluster: LocalCluster, ns: str, tmp_path: Path) -> Iterator[NodeAgent]:
    """Runs the test namespace's pods; at the end, the service is deleted and no pod is left."""
    agent = NodeAgent(
        cluster.kubeconfig, ns, tmp_path / "pods", env={"KUBECONFIG": str(cluster.kubeconfig)}
    ).start()
    try:
        yield agent
    finally:
        cluster.kubectl("delete", "llmservice", "chat", "-n", ns, "--wait=true", check=False)
        agent.stop()
    assert agent.pods == {}


@pytest.fixture
def users() -> Iterator[Callable[..., Users]]:
    """Starts Users; whatever a test leaves running is stopped after it."""
    started: list[Users] = []

    def start(*args: Any, **kwargs: Any) -> Users:
        started.append(Users(*args, **kwargs))
        return started[-1]

    yield start
    for u in started:
        u.stop()


def start_service(
    cluster: LocalCluster, prometheus: LocalPrometheus, ns: str, doc: dict[str, Any]
) -> str:
    """Apply `doc`, wait for its router and a ready engine, point Prometheus at the router;
    returns the router's address."""
    apply(cluster, doc, ns)
    name = doc["metadata"]["name"]

    def router_ip() -> str | None:
        pods = cluster.kubectl(
            "get", "pods", "-n", ns, "-l", "app.kubernetes.io/component=router",
            "-o", "jsonpath={.items[*].status.podIP}",
        ).stdout.split()  # fmt: skip
        return pods[0] if len(pods) == 1 else None

    ip = wait_for("the router pod", router_ip, timeout=60)
    wait_for(
        "Ready",
        lambda: (get(cluster, "llmservice", name, ns) or {}).get("status", {}).get("readyReplicas"),
        timeout=240,
    )
    labels = {
        "namespace": ns,
        "kvpilot_io_llmservice": name,
        "app_kubernetes_io_component": "router",
    }
    prometheus.set_targets([(f"{ip}:8000", labels)])
    return ip


ENGINE = {"kvCacheMemory": "64MiB", "maxNumSeqs": 8, "drainTimeoutSeconds": 5}
MODEL = {"source": {"path": "smollm2"}, "dtype": "float32", "maxContext": 512}


def chat_doc(rollout: dict[str, Any]) -> dict[str, Any]:
    """The LLMService both tests roll out: one small SmolLM2 engine, never autoscaled."""
    return service_doc(
        "chat",
        quantization="none",
        model=MODEL,
        engine=ENGINE,
        scaling={"minReplicas": 1, "maxReplicas": 1},
        rollout=rollout,
    )


def canary(cluster: LocalCluster, ns: str) -> dict[str, Any]:
    return ((get(cluster, "llmservice", "chat", ns) or {}).get("status") or {}).get("canary") or {}


def test_slow_canary_rolls_back_healthy_canary_is_promoted(
    cluster: LocalCluster,
    prometheus: LocalPrometheus,
    rollout_operator: Operator,
    agent: NodeAgent,
    users: Callable[..., Users],
    ns: str,
) -> None:
    doc = chat_doc(
        {
            "canary": {
                "steps": [50, 100],
                "stepSeconds": 10,
                # Two engines share two cores here: only a gross regression should fail.
                "maxTtftRegression": 1.0,
                "maxTpotRegression": 1.0,
            }
        },
    )
    ip = start_service(cluster, prometheus, ns, doc)
    stable = get(cluster, "llmservice", "chat", ns)["status"]["stableRevision"]
    user = users(f"http://{ip}:8000/v1")
    wait_for("users served", lambda: user.ok >= 5, timeout=120)

    # 1. A canary whose engine is slow (fault injection: 150 ms per step) is rolled back.
    slow = {**ENGINE, "extraArgs": ["--inject-step-delay", "0.15"]}
    apply(cluster, {**doc, "spec": {**doc["spec"], "engine": slow}}, ns)
    started = wait_for("a canary", lambda: canary(cluster, ns).get("phase"), timeout=30)
    assert started == "Progressing" and canary(cluster, ns)["weight"] == 50
    assert canary(cluster, ns)["stableRevision"] == stable
    wait_for("the canary engine", lambda: get(cluster, "deployment", "chat-engine-canary", ns))
    rolled_back = wait_for(
        "rollback",
        lambda: canary(cluster, ns) if canary(cluster, ns).get("phase") == "RolledBack" else None,
        timeout=180,
    )
    assert rolled_back["verdict"] == "Fail" and rolled_back["weight"] == 0
    assert any("TPOT" in r for r in rolled_back["reasons"]), rolled_back
    analysis = rolled_back["analysis"]
    assert analysis["canaryTpotP95Ms"] > 2 * analysis["stableTpotP95Ms"]
    wait_for(
        "the canary Deployment to go",
        lambda: get(cluster, "deployment", "chat-engine-canary", ns) is None,
    )
    reasons = [e["reason"] for e in events(cluster, ns, "chat")]
    assert "CanaryRolledBack" in reasons
    svc = get(cluster, "llmservice", "chat", ns)
    assert svc["status"]["stableRevision"] == stable  # the stable engines never changed

    # 2. A healthy change walks 50% -> 100% and is promoted.
    healthy = {**ENGINE, "maxWaiting": 128}
    apply(cluster, {**doc, "spec": {**doc["spec"], "engine": healthy}}, ns)
    wait_for(
        "a new canary",
        lambda: (
            canary(cluster, ns).get("phase") == "Progressing"
            and canary(cluster, ns)["revision"] != rolled_back["revision"]
        ),
    )
    new_revision = canary(cluster, ns)["revision"]
    done = wait_for(
        "promotion",
        lambda: canary(cluster, ns) if canary(cluster, ns).get("phase") == "Promoted" else None,
        timeout=300,
    )
    assert done["revision"] == new_revision and done["verdict"] == "Pass"
    wait_for(
        "the stable revision to be the canary's",
        lambda: get(cluster, "llmservice", "chat", ns)["status"]["stableRevision"] == new_revision,
    )
    wait_for(
        "the canary Deployment to go",
        lambda: get(cluster, "deployment", "chat-engine-canary", ns) is None,
    )
    dep = get(cluster, "deployment", "chat-engine", ns)
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--max-waiting") + 1] == "128"
    reasons = [e["reason"] for e in events(cluster, ns, "chat")]
    for reason in ("CanaryStep", "CanaryPromoting", "CanaryPromoted"):
        assert reason in reasons, reasons
    served_before = user.ok
    wait_for("users served after promotion", lambda: user.ok >= served_before + 3)
    user.stop()
    assert user.errors == [], user.errors[:5]


def test_identical_shadow_agrees_and_never_counts_as_an_engine(
    cluster: LocalCluster,
    prometheus: LocalPrometheus,
    rollout_operator: Operator,
    agent: NodeAgent,
    users: Callable[..., Users],
    ns: str,
) -> None:
    doc = chat_doc({"shadow": {"mirrorPercent": 100}})
    ip = start_service(cluster, prometheus, ns, doc)
    wait_for(
        "the shadow engine ready",
        lambda: (
            (get(cluster, "deployment", "chat-engine-shadow", ns) or {})
            .get("status", {})
            .get("readyReplicas")
        ),
        timeout=240,
    )
    user = users(f"http://{ip}:8000/v1", workers=2)

    def agreed() -> dict[str, Any] | None:
        shadow = get(cluster, "llmservice", "chat", ns)["status"].get("shadow") or {}
        return shadow if shadow.get("greedyCompared", 0) >= 5 else None

    shadow = wait_for("shadow comparisons in status", agreed, timeout=180)
    user.stop()
    assert user.errors == [], user.errors[:5]
    # Not exactly 1.0: the engines are not batch-invariant (as vLLM's are not by default). The
    # stable engine batches two users' requests while the shadow gets the copies at other
    # moments, and float32 CPU matmuls round differently at another batch size, which can flip
    # a near-tie. Seen: 28 of 28 in most runs, 27 of 28 in one.
    assert shadow["greedyAgreement"] >= 0.9, shadow
    # Not mirrored >= greedyCompared: the status takes each counter's increase() from
    # Prometheus, which extrapolates every series on its own and misses what a series counted
    # before its first scrape (seen: 9 mirrored against 11 compared in one run).
    assert shadow["errors"] == 0 and shadow["mirrored"] > 0
    svc = get(cluster, "llmservice", "chat", ns)
    healthy = condition(svc, "ShadowHealthy")
    assert healthy["status"] == "True" and "greedy agreement" in healthy["message"], healthy
    # The shadow is no engine of the service: not in the scale selector...
    selected = cluster.kubectl(
        "get", "pods", "-n", ns, "-l", svc["status"]["selector"], "-o", "name"
    ).stdout.split()  # fmt: skip
    assert len(selected) == 1 and "shadow" not in selected[0]
    # ...and not in the series the autoscaler reads, with every pod scraped as the
    # kubernetes-pods job would (pod labels mapped to Prometheus labels).
    from kvpilot_operator.api.names import ENGINE_SERIES, PROMETHEUS_SELECTOR

    targets = []
    for component in ("router", "engine", "shadow"):
        (pod_ip,) = cluster.kubectl(
            "get", "pods", "-n", ns, "-l", f"app.kubernetes.io/component={component}",
            "-o", "jsonpath={.items[*].status.podIP}",
        ).stdout.split()  # fmt: skip
        labels = {
            "namespace": ns,
            "kvpilot_io_llmservice": "chat",
            "app_kubernetes_io_component": component,
        }
        targets.append((f"{pod_ip}:8000", labels))
    prometheus.set_targets(targets)
    sel = PROMETHEUS_SELECTOR.format(namespace=ns, name="chat")
    prometheus.wait_for_series(f"vllm:num_requests_running{{{sel}}}", timeout=60)
    wait_for(
        "both engines scraped",
        lambda: len(prometheus.query(f"vllm:num_requests_running{{{sel}}}")) == 2,
    )
    serving = prometheus.query(f"vllm:num_requests_running{{{sel},{ENGINE_SERIES}}}")
    assert [s["metric"]["app_kubernetes_io_component"] for s in serving] == ["engine"]
