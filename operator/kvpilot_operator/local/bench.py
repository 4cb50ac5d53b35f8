"""`kvpilot bench operator`: the operator at scale on a real (local) control plane.

Applies N LLMServices at once, with the autoscaler on (a real Prometheus) and canary rollouts on
a quarter of them, and measures the time until every one is reconciled (its Deployment, Service
and PDB exist and status.observedGeneration matches), the time for one more service applied
after them, the operator's memory (RSS from /proc), and, from the API server's audit log, the
requests per second the operator and one router make at rest."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from kvpilot_operator.local.cluster import LocalCluster, ensure_binaries, free_ports
from kvpilot_operator.local.prometheus import LocalPrometheus
from kvpilot_operator.packaged import packaged


def _rss_kib(pid: int) -> tuple[int, int]:
    """(current, peak) resident set size of a process, KiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def _service(i: int, namespace: str) -> dict[str, Any]:
    """A mix of the presets and no policy; every fourth service also has a canary rollout, so
    the rollout loop has work as well as the autoscaler."""
    policies = ["interactive-chat", "copilot", "offline-batch", None]
    spec: dict[str, Any] = {"model": {"source": {"path": "smollm2"}}, "quantization": "none"}
    if policies[i % 4]:
        spec["policy"] = policies[i % 4]
    if i % 4 == 1:
        spec["rollout"] = {"canary": {"steps": [10, 50, 100], "stepSeconds": 60}}
    return {
        "apiVersion": "kvpilot.io/v1alpha1",
        "kind": "LLMService",
        "metadata": {"name": f"svc-{i:04d}", "namespace": namespace},
        "spec": spec,
    }


def _services(n: int, namespace: str) -> str:
    return yaml.safe_dump_all([_service(i, namespace) for i in range(n)])


def requests_per_user(audit_log: Path, since: float, until: float) -> dict[str, int]:
    """Requests the API server answered between two wall-clock times, by user name (the audit
    log's JSON lines; one per answered request, a watch counted when it ends)."""
    counts: dict[str, int] = {}
    for line in audit_log.read_text().splitlines():
        event = json.loads(line)
        when = dt.datetime.fromisoformat(event["requestReceivedTimestamp"].replace("Z", "+00:00"))
        if since <= when.timestamp() < until:
            user = event["user"]["username"]
            counts[user] = counts.get(user, 0) + 1
    return counts


def _reconciled(cluster: LocalCluster, namespace: str) -> int:
    # One kubectl for the four kinds: the poll runs four times a second on the same two cores
    # as what it measures, and four processes a poll took a fifth of a core.
    kinds = "llmservices,deployments,services,poddisruptionbudgets"
    out = cluster.kubectl("get", kinds, "-n", namespace, "-o", "json").stdout
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for item in json.loads(out)["items"]:
        by_kind.setdefault(item["kind"], []).append(item)

    def names(kind: str) -> set[str]:
        return {o["metadata"]["name"] for o in by_kind.get(kind, [])}

    services = by_kind.get("LLMService", [])
    deployments, svcs, pdbs = names("Deployment"), names("Service"), names("PodDisruptionBudget")
    done = 0
    for svc in services:
        name = svc["metadata"]["name"]
        status = svc.get("status") or {}
        if (
            status.get("observedGeneration") == svc["metadata"]["generation"]
            and f"{name}-engine" in deployments
            and name in svcs
            and f"{name}-engine" in pdbs
        ):
            done += 1
    return done


def _wait_reconciled(
    cluster: LocalCluster, op: subprocess.Popen[bytes], log: Path, n: int, t0: float, timeout: float
) -> int:
    """Poll until n services are reconciled; returns the operator's peak RSS (KiB) meanwhile."""
    done, peak = 0, 0
    with tqdm(total=n, desc="reconciled", unit="svc") as bar:
        while done < n:
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"only {done}/{n} reconciled after {timeout:.0f}s")
            if op.poll() is not None:
                raise RuntimeError(f"operator exited {op.returncode}:\n" + log.read_text()[-3000:])
            now = _reconciled(cluster, "bench")
            bar.update(now - done)
            done = now
            peak = max(peak, _rss_kib(op.pid)[1])
            time.sleep(0.25)
    return peak


def run(n: int, timeout: float, rest_s: float = 30.0, settle_s: float = 60.0) -> dict[str, Any]:
    """N services with the autoscaler (a real, empty Prometheus: every evaluation holds) and,
    on a quarter of them, canary rollouts; then one more service; then a quiet window in which
    the API server's audit log counts the operator's and one router's requests."""
    ensure_binaries()
    with (
        LocalCluster(audit=True) as cluster,
        LocalPrometheus() as prom,
        tempfile.TemporaryDirectory() as tmp,
    ):
        cluster.kubectl("apply", "--validate=false", "-f", str(packaged("crds")))  # CEL: 1.25+
        cluster.kubectl(
            "wait", "--for=condition=Established", "--timeout=60s", "crd/llmservices.kvpilot.io"
        )
        cluster.kubectl("apply", "-f", str(packaged("policies")))
        cluster.kubectl("create", "namespace", "bench")
        log = Path(tmp) / "operator.log"
        env = {**cluster.env(), "KUBECONFIG": str(cluster.kubeconfigs["operator"])}
        with log.open("wb") as out:
            op = subprocess.Popen(
                [
                    sys.executable, "-m", "kvpilot_engine.cli", "operator",
                    "--health-port", "0", "--metrics-port", "0",
                    "--prometheus-url", prom.url,
                ],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        router = None
        try:
            time.sleep(3)  # kopf's initial listing of an empty cluster
            idle_rss, _ = _rss_kib(op.pid)
            manifest = Path(tmp) / "services.yaml"
            manifest.write_text(_services(n, "bench"))
            t0 = time.monotonic()
            cluster.kubectl("apply", "-f", str(manifest))
            applied_s = time.monotonic() - t0
            peak = _wait_reconciled(cluster, op, log, n, t0, timeout)
            all_s = time.monotonic() - t0
            # One more, into an operator that now evaluates n services every interval.
            late = Path(tmp) / "late.yaml"
            late.write_text(yaml.safe_dump(_service(n, "bench")))
            t1 = time.monotonic()
            cluster.kubectl("apply", "-f", str(late))
            peak = max(peak, _wait_reconciled(cluster, op, log, n + 1, t1, timeout))
            late_s = time.monotonic() - t1
            router_env = {**cluster.env(), "KUBECONFIG": str(cluster.kubeconfigs["router"])}
            router = subprocess.Popen(
                [
                    sys.executable, "-m", "kvpilot_engine.cli", "router", "--host", "127.0.0.1",
                    "--port", str(free_ports(1)[0]), "--namespace", "bench",
                    "--service", "svc-0000",
                ],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=router_env,
            )  # fmt: skip
            # Both settle: the router's first listing, the status refreshes that the controllers'
            # writes to 200 new Deployments cause, the loops' first passes over every service.
            time.sleep(settle_s)
            since = time.time()
            time.sleep(rest_s)
            counts = requests_per_user(cluster.audit_log, since, time.time())
            rss, peak = _rss_kib(op.pid)
        finally:
            if router is not None:
                router.terminate()
                router.wait(timeout=30)
            op.send_signal(signal.SIGTERM)
            op.wait(timeout=30)
    return {
        "services": n,
        "kubectl_apply_s": round(applied_s, 2),
        "all_reconciled_s": round(all_s, 2),
        "services_per_s": round(n / all_s, 1),
        "one_more_reconciled_s": round(late_s, 2),
        "operator_rss_idle_mib": round(idle_rss / 1024, 1),
        "operator_rss_after_mib": round(rss / 1024, 1),
        "operator_rss_peak_mib": round(peak / 1024, 1),
        "operator_api_requests_per_s_at_rest": round(counts.get("kvpilot-operator", 0) / rest_s, 2),
        "router_api_requests_per_s_at_rest": round(counts.get("kvpilot-router", 0) / rest_s, 2),
    }


def main(ns: argparse.Namespace) -> int:
    figures = run(ns.services, ns.timeout)
    for key, value in figures.items():
        print(f"{key:>24}: {value}")
    if ns.json:
        Path(ns.json).write_text(json.dumps(figures, indent=2))
    return 0
