"""The SLO autoscaler end to end: a real Prometheus (Debian's) scraping real metrics endpoints, the
real API server, and `kvpilot operator --prometheus-url`.

The metrics endpoints serve the engine's own metric families (`kvpilot_engine.server.metrics`,
same names and buckets) from a load generator whose request rate and latency distribution the
test sets: a stand-in for engine pods, since there is no kubelet here to run them. Pods are
marked ready as a kubelet would (see act_as_kubelet).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from kvpilot_engine.server.metrics import ServerMetrics
from kvpilot_operator.local.cluster import LocalCluster
from kvpilot_operator.local.procs import free_ports
from kvpilot_operator.local.prometheus import LocalPrometheus
from kvpilot_operator.router.batch.metrics import BatchMetrics
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from tests.support.kube import (
    Operator,
    apply,
    condition,
    events,
    get,
    running_and_ready,
    running_operator,
    service_doc,
    wait_for,
)
from tests.support.router import routes, run_router

pytestmark = pytest.mark.slow
LABEL = "kvpilot_io_llmservice"


def serve_metrics(registry: CollectorRegistry) -> ThreadingHTTPServer:
    """A loopback /metrics endpoint for `registry`, served on a thread."""

    class Handler(BaseHTTPRequestHandler):
        # What the engine's /metrics sends: the classic text format whatever the Accept
        # header (prometheus_client's own server would negotiate OpenMetrics, whose names
        # escape the colons of vLLM's metric names).
        def do_GET(self) -> None:
            body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class EngineMetrics:
    """An endpoint with the engine's metrics, fed `rate` requests/s of the given latencies."""

    def __init__(self) -> None:
        self.metrics = ServerMetrics("smollm2")
        self.server = serve_metrics(self.metrics.registry)
        self.port = self.server.server_address[1]
        self.rate, self.ttft, self.tpot = 2.0, 0.1, 0.02
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def set(self, rate: float, ttft: float, tpot: float) -> None:
        self.rate, self.ttft, self.tpot = rate, ttft, tpot

    def _run(self) -> None:
        m, owed = self.metrics, 0.0
        while not self._stop.wait(0.1):
            owed += self.rate * 0.1
            while owed >= 1:
                owed -= 1
                m.received.inc()
                m.ttft.observe(self.ttft)
                for _ in range(4):
                    m.itl.observe(self.tpot)
                m.prompt_tokens.inc(200)
                m.generation_tokens.inc(100)
                m._success.labels("smollm2", "stop").inc()
            for _ in range(5):  # engine steps: 15 ms for 50 tokens
                m.step_time.observe(0.015)
                m.step_decode.observe(50)
                m.step_prefill.observe(0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.server.shutdown()
        self.server.server_close()


class Kubelet:
    """Marks every engine pod of the namespace Running and Ready, as a kubelet would report."""

    def __init__(self, cluster: LocalCluster, ns: str) -> None:
        from kubernetes import client, config

        self.api = client.CoreV1Api(config.new_client_from_config(str(cluster.kubeconfig)))
        self.ns = ns
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                pods = self.api.list_namespaced_pod(self.ns).items
                for pod in pods:
                    if pod.status.phase != "Running" and not pod.metadata.deletion_timestamp:
                        self.api.patch_namespaced_pod_status(
                            pod.metadata.name, self.ns, running_and_ready()
                        )
            except Exception:  # a pod deleted under us: next round
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def autoscaling_operator(
    cluster: LocalCluster, prometheus: LocalPrometheus, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Operator]:
    port = free_ports(1)[0]
    with running_operator(
        cluster,
        tmp_path_factory.mktemp("autoscaler") / "operator.log",
        "--prometheus-url", prometheus.url, "--autoscale-interval", "1",
        "--metrics-port", str(port),
    ) as op:  # fmt: skip
        op.metrics_url = f"http://127.0.0.1:{port}/metrics"  # type: ignore[attr-defined]
        yield op


SCALING = {
    "minReplicas": 1,
    "maxReplicas": 4,
    "stableWindowSeconds": 10,
    "panicWindowSeconds": 5,
    "scaleUpCooldownSeconds": 0,
    "scaleDownCooldownSeconds": 0,
    "tolerance": 0.1,
    "maxScaleUpRate": 4.0,
    "maxScaleDownRate": 4.0,
}
SLO = {
    "ttft": {"percentile": 95, "targetMs": 500},
    "tpot": {"percentile": 95, "targetMs": 50},
    "window": "30s",
}


def spec_replicas(cluster: LocalCluster, name: str, ns: str) -> int | None:
    svc = get(cluster, "llmservice", name, ns) or {}
    return svc.get("spec", {}).get("replicas")


def deployment_replicas(cluster: LocalCluster, name: str, ns: str) -> int | None:
    dep = get(cluster, "deployment", f"{name}-engine", ns) or {}
    return dep.get("spec", {}).get("replicas")


def test_slo_breach_scales_up_recovery_scales_down_and_no_data_holds(
    cluster: LocalCluster,
    prometheus: LocalPrometheus,
    autoscaling_operator: Operator,
    ns: str,
    tmp_path: Path,
) -> None:
    engine = EngineMetrics()
    kubelet = Kubelet(cluster, ns)
    try:
        prometheus.set_targets([(f"127.0.0.1:{engine.port}", {"namespace": ns, LABEL: "chat"})])
        apply(cluster, service_doc("chat", slo=SLO, scaling=SCALING), ns)
        prometheus.wait_for_series(f'up{{{LABEL}="chat"}} == 1', timeout=30)

        # Healthy at 2 req/s: the SLO is met and one replica stays.
        def slo_met() -> dict | None:
            svc = get(cluster, "llmservice", "chat", ns)
            ok = condition(svc, "SLOMet").get("status") == "True"
            active = condition(svc, "ScalingActive").get("status") == "True"
            return svc if ok and active else None

        svc = wait_for("SLOMet True", slo_met, timeout=60)
        assert svc["status"]["sloMet"] == "True" and 50 < svc["status"]["ttftP95Ms"] < 500
        assert deployment_replicas(cluster, "chat", ns) == 1

        # TTFT four times its target under 10x the load: more replicas, through spec.replicas.
        engine.set(rate=20, ttft=2.0, tpot=0.02)
        up = wait_for(
            "scale-up", lambda: (spec_replicas(cluster, "chat", ns) or 0) > 1 or None, timeout=60
        )
        assert up
        wait_for(
            "the Deployment to follow",
            lambda: deployment_replicas(cluster, "chat", ns) == spec_replicas(cluster, "chat", ns),
        )
        svc = get(cluster, "llmservice", "chat", ns)
        first = svc["status"]["lastDecisions"][0]
        assert first["from"] == 1 and first["to"] > 1 and first["applied"] is True
        assert condition(svc, "SLOMet")["status"] in ("False", "True")  # 30 s window
        assert any(e["reason"] == "ScaledUp" for e in events(cluster, ns, "chat"))
        peak = wait_for(
            "max replicas under a sustained breach",
            lambda: spec_replicas(cluster, "chat", ns) == 4 or None,
            timeout=90,
        )
        assert peak

        # The operator's own metrics tell the same story.
        scraped = urllib.request.urlopen(autoscaling_operator.metrics_url).read().decode()
        labels = f'llmservice="chat",namespace="{ns}"'
        assert f"kvpilot_autoscaler_desired_replicas{{{labels}}} 4.0" in scraped
        assert f'kvpilot_autoscaler_decisions_total{{applied="true",direction="up",{labels}}}' in (
            scraped
        )
        assert f"kvpilot_autoscaler_capacity_tokens_per_second{{{labels}}}" in scraped

        # Recovered: back to one replica once the stable window has passed.
        engine.set(rate=2, ttft=0.1, tpot=0.02)
        recovered_at = time.monotonic()
        wait_for("scale-down", lambda: spec_replicas(cluster, "chat", ns) == 1, timeout=90)
        assert time.monotonic() - recovered_at >= SCALING["stableWindowSeconds"]
        wait_for("the Deployment to follow", lambda: deployment_replicas(cluster, "chat", ns) == 1)
        svc = get(cluster, "llmservice", "chat", ns)
        assert any(d["to"] < d["from"] for d in svc["status"]["lastDecisions"])
        assert any(e["reason"] == "ScaledDown" for e in events(cluster, ns, "chat"))

        # Prometheus down: the load it can no longer see would breach, but replicas hold.
        engine.set(rate=20, ttft=2.0, tpot=0.02)
        prometheus.stop_process()
        try:

            def unreachable() -> dict | None:
                svc = get(cluster, "llmservice", "chat", ns)
                cond = condition(svc, "ScalingActive")
                return cond if cond.get("reason") == "PrometheusUnreachable" else None

            cond = wait_for("ScalingActive False", unreachable, timeout=30)
            assert cond["status"] == "False" and prometheus.url.split("//")[1] in cond["message"]
            time.sleep(5)
            assert spec_replicas(cluster, "chat", ns) == 1
            assert deployment_replicas(cluster, "chat", ns) == 1
            svc = get(cluster, "llmservice", "chat", ns)
            assert svc["status"]["sloMet"] == "Unknown"
            assert any(e["reason"] == "PrometheusUnreachable" for e in events(cluster, ns, "chat"))
        finally:
            prometheus.start_process()
        wait_for(
            "ScalingActive True again",
            lambda: (
                condition(get(cluster, "llmservice", "chat", ns), "ScalingActive").get("status")
                == "True"
            ),
            timeout=60,
        )
        # The operator's own conditions survived the autoscaler's status writes, and vice versa.
        svc = get(cluster, "llmservice", "chat", ns)
        kinds = {c["type"] for c in svc["status"]["conditions"]}
        assert {"Ready", "Progressing", "Degraded"} <= kinds
        assert {"ScalingActive", "AbleToScale", "SLOMet"} <= kinds
    finally:
        kubelet.close()
        engine.close()


def test_advisory_mode_records_but_writes_nothing(
    cluster: LocalCluster,
    prometheus: LocalPrometheus,
    autoscaling_operator: Operator,
    ns: str,
) -> None:
    engine = EngineMetrics()
    engine.set(rate=20, ttft=2.0, tpot=0.2)
    try:
        prometheus.set_targets([(f"127.0.0.1:{engine.port}", {"namespace": ns, LABEL: "advisor"})])
        scaling = {**SCALING, "mode": "advisory"}
        apply(cluster, service_doc("advisor", slo=SLO, scaling=scaling), ns)

        def recommended() -> list | None:
            svc = get(cluster, "llmservice", "advisor", ns) or {}
            return (svc.get("status") or {}).get("lastDecisions")

        decisions = wait_for("an advisory decision", recommended, timeout=60)
        assert decisions[0]["applied"] is False and decisions[0]["to"] > 1
        time.sleep(3)
        assert spec_replicas(cluster, "advisor", ns) is None
        assert deployment_replicas(cluster, "advisor", ns) == 1
        assert any(e["reason"] == "ScaleRecommended" for e in events(cluster, ns, "advisor"))
    finally:
        engine.close()


class BatchRouterMetrics:
    """An endpoint with the router's `kvpilot_batch_*` metrics for one batch whose backlog
    drains at `rate` requests/s (set by the test), against a completion window."""

    def __init__(self, total: int, deadline_at: float, rate: float) -> None:
        registry = CollectorRegistry()
        self.metrics = BatchMetrics(registry)
        self.server = serve_metrics(registry)
        self.port = self.server.server_address[1]
        self.total, self.deadline_at, self.rate = total, deadline_at, rate
        self.done = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def finish(self) -> None:
        """The rest of the batch is answered at once (say, the interactive load went away)."""
        self.rate, self.done = 0.0, float(self.total)

    def _run(self) -> None:
        m, counted = self.metrics, 0
        last = time.monotonic()
        while not self._stop.wait(0.1):
            # By the clock, not by the 0.1 s asked of wait(): on a busy machine the loop runs
            # late, and the rate the operator measures must still be `rate`.
            now = time.monotonic()
            self.done = min(float(self.total), self.done + self.rate * (now - last))
            last = now
            m.finished.labels("completed").inc(int(self.done) - counted)
            m.tokens.labels("prompt").inc(1500 * (int(self.done) - counted))
            m.tokens.labels("completion").inc(500 * (int(self.done) - counted))
            counted = int(self.done)
            left = self.total - counted
            active = left > 0
            m.requests.labels("queued").set(max(0, left - 4))
            m.requests.labels("running").set(min(4, left))
            m.batches.labels("in_progress").set(int(active))
            m.batches.labels("completed").set(int(not active))
            m.deadline_at.set(self.deadline_at if active else 0)
            for state, n in (("total", self.total), ("completed", counted), ("failed", 0)):
                m.active_requests.labels(state).set(n if active else 0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.server.shutdown()
        self.server.server_close()


def test_batch_deadline_adds_replicas_in_time_and_status_batches(
    cluster: LocalCluster,
    prometheus: LocalPrometheus,
    autoscaling_operator: Operator,
    ns: str,
    tmp_path: Path,
) -> None:
    """A batch backlog that the measured rate would not finish before its window closes: the
    operator asks for the replicas that would (the healthy interactive load alone wants one),
    reports the progress and the risk in status.batches, and goes back to one replica once the
    backlog is gone. Beside it, a real `kvpilot router` holding a batch for a service with no
    engine up: its status.batches comes from that router's own series."""
    engine = EngineMetrics()
    # 240 requests at 1/s with 90 s left: 240 * 1.25 / 90 = 3.3/s wanted, 1/s per replica.
    batch = BatchRouterMetrics(total=240, deadline_at=time.time() + 90, rate=1.0)
    kubelet = Kubelet(cluster, ns)
    store = tmp_path / "batches"
    router_doc = routes({"stable": (100, [])})
    try:
        with run_router(tmp_path, router_doc, "--batch-dir", str(store)) as router:
            lines = [
                {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                 "body": {"model": "smollm2", "prompt": "hi", "max_tokens": 1}}
                for i in range(7)
            ]  # fmt: skip
            data = "\n".join(json.dumps(x) for x in lines).encode()
            with httpx.Client(base_url=router.url, timeout=10) as c:
                f = c.post("/v1/files", files={"file": ("in.jsonl", data)},
                           data={"purpose": "batch"}).json()  # fmt: skip
                created = c.post(
                    "/v1/batches",
                    json={"input_file_id": f["id"], "endpoint": "/v1/completions",
                          "completion_window": "2h"},
                ).json()  # fmt: skip
            router_labels = {"namespace": ns, "app_kubernetes_io_component": "router"}
            prometheus.set_targets([
                (f"127.0.0.1:{engine.port}", {"namespace": ns, LABEL: "deadline"}),
                (f"127.0.0.1:{batch.port}", {**router_labels, LABEL: "deadline"}),
                (f"127.0.0.1:{router.port}", {**router_labels, LABEL: "batchy"}),
            ])  # fmt: skip
            batching = {"batch": {"enabled": True}}
            apply(cluster, service_doc("deadline", slo=SLO, scaling=SCALING, **batching), ns)
            apply(cluster, service_doc("batchy", slo=SLO, scaling=SCALING, **batching), ns)

            def scaled_for_the_deadline() -> dict | None:
                svc = get(cluster, "llmservice", "deadline", ns) or {}
                decisions = (svc.get("status") or {}).get("lastDecisions") or []
                return decisions[0] if decisions else None

            first = wait_for("the deadline's scale-up", scaled_for_the_deadline, timeout=60)
            assert first["from"] == 1 and first["to"] >= 3, first
            assert "batch backlog" in first["reason"] and first["applied"] is True
            assert time.time() < batch.deadline_at - 30  # in time to matter
            status = get(cluster, "llmservice", "deadline", ns)["status"]["batches"]
            assert status["active"] == 1 and status["byStatus"] == {"in_progress": 1}
            assert status["requestsTotal"] == 240 and 0 < status["requestsCompleted"] < 240
            assert status["deadlineAtRisk"] is True and 0.7 < status["finishRate"] < 1.5
            assert status["nearestDeadline"] == time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(batch.deadline_at))
            )

            # The real router's batch, as the operator reports it.
            def router_summary() -> dict | None:
                svc = get(cluster, "llmservice", "batchy", ns) or {}
                return (svc.get("status") or {}).get("batches")

            summary = wait_for("batchy's status.batches", router_summary, timeout=30)
            assert summary["active"] == 1 and summary["byStatus"] == {"in_progress": 1}
            assert (summary["requestsTotal"], summary["requestsCompleted"]) == (7, 0)
            assert summary["nearestDeadline"] == time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(created["expires_at"])
            )

        # The backlog is gone: back to the one replica the interactive load needs.
        batch.finish()
        wait_for("scale-down", lambda: spec_replicas(cluster, "deadline", ns) == 1, timeout=60)

        def settled() -> dict | None:
            st = get(cluster, "llmservice", "deadline", ns)["status"]["batches"]
            return st if st["active"] == 0 else None

        status = wait_for("status.batches to settle", settled, timeout=30)
        assert status["byStatus"] == {"completed": 1}
        assert "nearestDeadline" not in status and "deadlineAtRisk" not in status
    finally:
        kubelet.close()
        batch.close()
        engine.close()
