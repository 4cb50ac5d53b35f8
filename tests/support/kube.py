"""Helpers for tests that drive the operator on a local control plane: start `kvpilot operator`,
apply and read objects with kubectl, wait for conditions, and stream users through a router."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml
from kvpilot_operator.controller.status import find_condition
from kvpilot_operator.local.cluster import LocalCluster

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def wait_for(
    what: str, fn: Callable[[], T | None], timeout: float = 30.0, interval: float = 0.2
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Operator:
    """`kvpilot operator` as a subprocess against the test cluster."""

    def __init__(
        self,
        cluster: LocalCluster,
        log: Path,
        extra_args: tuple[str, ...] = (),
        kubeconfig: Path | None = None,  # default: the cluster's admin
    ) -> None:
        self.cluster, self.log, self.extra_args = cluster, log, extra_args
        self.kubeconfig = kubeconfig or cluster.kubeconfig
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "kvpilot_engine.cli",
            "operator",
            "--kubeconfig",
            str(self.kubeconfig),
            "--health-port",
            "0",
            "--metrics-port",
            "0",
            "--log-format",
            "plain",
            *self.extra_args,
        ]
        if not any(a.startswith("--leader-election") for a in self.extra_args):
            # One operator per test: no Lease to wait out after a test that killed its operator
            # (tests/operator/test_leader_election.py runs the election on a Lease of its own).
            cmd.append("--no-leader-election")
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.cluster.env(),
                start_new_session=True,
            )

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def running_operator(cluster: LocalCluster, log: Path, *args: str) -> Iterator[Operator]:
    """The CRDs installed and `kvpilot operator ARGS` running; its exit code checked after."""
    # kubectl 1.20 does not know the CEL rules' field (x-kubernetes-validations), its server does.
    cluster.kubectl("apply", "--validate=false", "-f", str(ROOT / "crds"))
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/llmservices.kvpilot.io"
    )
    op = Operator(cluster, log, args)
    op.start()
    try:
        yield op
    finally:
        code = op.stop()
        print(op.log_text()[-6000:])
        assert code in (0, -15), f"operator exited {code}"


def service_account_kubeconfig(cluster: LocalCluster, ns: str, account: str, path: Path) -> Path:
    """A kubeconfig that acts as a ServiceAccount (its token, which the 1.20 token controller
    puts in a Secret once the account exists), to run something under the RBAC it is given."""
    from kubernetes import client, config

    core = client.CoreV1Api(config.new_client_from_config(str(cluster.kubeconfig)))
    secret = wait_for(
        f"a token for {ns}/{account}",
        lambda: (core.read_namespaced_service_account(account, ns).secrets or [None])[0],
        timeout=30,
    )
    token = core.read_namespaced_secret(secret.name, ns).data["token"]
    kubeconfig = json.loads(cluster.kubeconfig.read_text())
    kubeconfig["users"] = [{"name": account, "user": {"token": base64.b64decode(token).decode()}}]
    kubeconfig["contexts"][0]["context"]["user"] = account
    path.write_text(json.dumps(kubeconfig))
    return path


def get(cluster: LocalCluster, kind: str, name: str, ns: str | None = None) -> dict | None:
    args = ["get", kind, name, "-o", "json"] + (["-n", ns] if ns else [])
    proc = cluster.kubectl(*args, check=False)
    if proc.returncode != 0:
        assert "NotFound" in proc.stderr, proc.stderr
        return None
    return json.loads(proc.stdout)


def apply(
    cluster: LocalCluster, doc: dict[str, Any], ns: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    args = ["apply", "-f", "-"] + (["-n", ns] if ns else [])
    return cluster.kubectl(*args, input=yaml.safe_dump(doc), check=check)


def service_doc(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kvpilot.io/v1alpha1",
        "kind": "LLMService",
        "metadata": {"name": name},
        "spec": {"model": {"source": {"path": "smollm2"}}, **spec},
    }


def condition(obj: dict | None, kind: str) -> dict[str, Any]:
    return find_condition(obj or {}, kind) or {}


def running_and_ready() -> dict[str, Any]:
    """The pod status patch a kubelet sends once the containers are up and ready."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    conds = [
        {"type": t, "status": "True", "lastTransitionTime": now}
        for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")
    ]
    return {"status": {"phase": "Running", "conditions": conds, "startTime": now}}


def events(cluster: LocalCluster, ns: str, name: str) -> list[dict[str, Any]]:
    out = cluster.kubectl(
        "get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}", "-o", "json"
    )
    return json.loads(out.stdout)["items"]


class Users:
    """`workers` users streaming greedy chat completions through a router until stopped; every
    failure is kept for the test to assert there is none."""

    def __init__(
        self,
        base_url: str,
        workers: int = 4,
        model: str = "chat",
        max_tokens: int = 6,
        prompt: str = "Count to three. ({i}.{n})",
    ) -> None:
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
        self.model, self.max_tokens, self.prompt = model, max_tokens, prompt
        self.ok = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def _run(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                stream = self.client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "user", "content": self.prompt.format(i=i, n=n)}],
                    max_tokens=self.max_tokens,
                    temperature=0,
                    stream=True,
                )
                assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
                self.ok += 1
            except Exception as err:  # recorded: the test asserts there are none
                self.errors.append(repr(err))
                time.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)
