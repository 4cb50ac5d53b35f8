"""`kvpilot bench operator`: reconcile throughput on a real (local) control plane.

Applies N LLMServices at once and measures the time until every one is reconciled (its
Deployment, Service and PDB exist and status.observedGeneration matches), the time until the
operator is idle again, and the operator's peak and final memory (RSS from /proc)."""

from __future__ import annotations

import argparse
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

from kvpilot_operator.local.cluster import LocalCluster, ensure_binaries
from kvpilot_operator.packaged import packaged


def _rss_kib(pid: int) -> tuple[int, int]:
    """(current, peak) resident set size of a process, KiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def _services(n: int, namespace: str) -> str:
    policies = ["interactive-chat", "copilot", "offline-batch", None]
    docs = []
    for i in range(n):
        spec: dict[str, Any] = {"model": {"source": {"path": "smollm2"}}, "quantization": "none"}
        if policies[i % 4]:
            spec["policy"] = policies[i % 4]
        docs.append(
            {
                "apiVersion": "kvpilot.io/v1alpha1",
                "kind": "LLMService",
                "metadata": {"name": f"svc-{i:04d}", "namespace": namespace},
                "spec": spec,
            }
        )
    return yaml.safe_dump_all(docs)


def _reconciled(cluster: LocalCluster, namespace: str) -> int:
    def items(kind: str) -> list[dict[str, Any]]:
        out = cluster.kubectl("get", kind, "-n", namespace, "-o", "json").stdout
        return json.loads(out)["items"]

    services = items("llmservices")
    deployments = {d["metadata"]["name"] for d in items("deployments")}
    svcs = {s["metadata"]["name"] for s in items("services")}
    pdbs = {p["metadata"]["name"] for p in items("poddisruptionbudgets")}
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


def run(n: int, timeout: float) -> dict[str, Any]:
    ensure_binaries()
    with LocalCluster() as cluster, tempfile.TemporaryDirectory() as tmp:
        cluster.kubectl("apply", "--validate=false", "-f", str(packaged("crds")))  # CEL: 1.25+
        cluster.kubectl(
            "wait", "--for=condition=Established", "--timeout=60s", "crd/llmservices.kvpilot.io"
        )
        cluster.kubectl("apply", "-f", str(packaged("policies")))
        cluster.kubectl("create", "namespace", "bench")
        log = Path(tmp) / "operator.log"
        with log.open("wb") as out:
            op = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kvpilot_engine.cli",
                    "operator",
                    "--kubeconfig",
                    str(cluster.kubeconfig),
                    "--health-port",
                    "0",
                    "--metrics-port",
                    "0",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=cluster.env(),
            )
        try:
            time.sleep(3)  # kopf's initial listing of an empty cluster
            idle_rss, _ = _rss_kib(op.pid)
            manifest = Path(tmp) / "services.yaml"
            manifest.write_text(_services(n, "bench"))
            t0 = time.monotonic()
            cluster.kubectl("apply", "-f", str(manifest))
            applied_s = time.monotonic() - t0
            done, peak = 0, idle_rss
            with tqdm(total=n, desc="reconciled", unit="svc") as bar:
                while done < n:
                    if time.monotonic() - t0 > timeout:
                        raise TimeoutError(f"only {done}/{n} reconciled after {timeout:.0f}s")
                    if op.poll() is not None:
                        raise RuntimeError(
                            f"operator exited {op.returncode}:\n" + log.read_text()[-3000:]
                        )
                    now = _reconciled(cluster, "bench")
                    bar.update(now - done)
                    done = now
                    peak = max(peak, _rss_kib(op.pid)[1])
                    time.sleep(0.5)
            all_s = time.monotonic() - t0
            rss, peak = _rss_kib(op.pid)
        finally:
            op.send_signal(signal.SIGTERM)
            op.wait(timeout=30)
    return {
        "services": n,
        "kubectl_apply_s": round(applied_s, 2),
        "all_reconciled_s": round(all_s, 2),
        "services_per_s": round(n / all_s, 1),
        "operator_rss_idle_mib": round(idle_rss / 1024, 1),
        "operator_rss_after_mib": round(rss / 1024, 1),
        "operator_rss_peak_mib": round(peak / 1024, 1),
    }


def main(ns: argparse.Namespace) -> int:
    figures = run(ns.services, ns.timeout)
    for key, value in figures.items():
        print(f"{key:>24}: {value}")
    if ns.json:
        Path(ns.json).write_text(json.dumps(figures, indent=2))
    return 0
