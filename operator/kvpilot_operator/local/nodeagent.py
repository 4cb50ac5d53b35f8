"""A stand-in for a kubelet on a machine without a container runtime: runs a namespace's pods as
local processes.

Each pod gets its own loopback address (127.x.y.z), so every pod can listen on its container
port as it would in a cluster. The container's command and args come from the pod spec (a
`--host` argument is pointed at the pod's address; `kvpilot` is this Python's `kvpilot`). The
agent reports what a kubelet would: phase Running, podIP, and the Ready condition from the
container's HTTP readiness probe; a process that exits turns its pod Failed. Pods that disappear
(the local control plane has no nodes, so unbound pods are deleted at once) get SIGTERM, then
SIGKILL after their grace period.

This is for tests and the one-machine quickstart only; it has none of a kubelet's isolation.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvpilot_operator.local.procs import child_setup_factory, signal_group

log = logging.getLogger("kvpilot.nodeagent")

# `kvpilot` in a container is this installation's CLI.
DEFAULT_COMMANDS = {"kvpilot": [sys.executable, "-m", "kvpilot_engine.cli"]}


@dataclass
class PodProcess:
    namespace: str
    name: str
    uid: str
    ip: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    probe: tuple[str, int] | None  # (path, port) of the readiness probe
    grace_s: float
    container: str = "main"
    image: str = ""
    message_policy: str = "File"  # the container's terminationMessagePolicy
    ready: bool = False
    failed: bool = False

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def pod_command(pod: dict[str, Any], ip: str, commands: dict[str, list[str]]) -> list[str]:
    """The first container's command and args, bound to `ip`."""
    container = pod["spec"]["containers"][0]
    command = list(container.get("command") or [])
    args = list(container.get("args") or [])
    if command and command[0] in commands:
        command = [*commands[command[0]], *command[1:]]
    if "--host" in args:
        args[args.index("--host") + 1] = ip
    return [*command, *args]


def readiness_probe(pod: dict[str, Any]) -> tuple[str, int] | None:
    container = pod["spec"]["containers"][0]
    get = (container.get("readinessProbe") or {}).get("httpGet")
    if not get:
        return None
    port = get.get("port")
    if isinstance(port, str):
        port = next(
            (p["containerPort"] for p in container.get("ports") or [] if p.get("name") == port),
            None,
        )
    return (get.get("path") or "/", int(port)) if port else None


def probe_ok(ip: str, probe: tuple[str, int]) -> bool:
    path, port = probe
    conn = http.client.HTTPConnection(ip, port, timeout=1.0)
    try:
        conn.request("GET", path)
        return 200 <= conn.getresponse().status < 400
    except OSError:
        return False
    finally:
        conn.close()


@dataclass
class NodeAgent:
    kubeconfig: Path
    namespace: str | None  # None: every namespace
    log_dir: Path
    # Pods to run (a label selector); None runs every pod of the namespace.
    label_selector: str | None = None
    commands: dict[str, list[str]] = field(default_factory=lambda: dict(DEFAULT_COMMANDS))
    env: dict[str, str] = field(default_factory=dict)  # on top of this process's and the pod's
    subnet: str = "127.77"  # pods get 127.77.0.1, 127.77.0.2, ...
    interval: float = 0.5

    pods: dict[str, PodProcess] = field(init=False, default_factory=dict)
    _stop: threading.Event = field(init=False, default_factory=threading.Event)
    _thread: threading.Thread | None = field(init=False, default=None)
    _ips: itertools.count[int] = field(init=False, default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def start(self) -> NodeAgent:
        from kubernetes import client, config

        self.api = client.CoreV1Api(config.new_client_from_config(str(self.kubeconfig)))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="nodeagent", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            procs = list(self.pods.values())
            self.pods.clear()
        for p in procs:
            self._terminate(p)

    def __enter__(self) -> NodeAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception:  # the API server may be restarting; keep going
                log.exception("node agent sync failed")
            self._stop.wait(self.interval)

    def sync(self) -> None:
        kwargs = {"label_selector": self.label_selector} if self.label_selector else {}
        if self.namespace is None:
            listing = self.api.list_pod_for_all_namespaces(**kwargs)
        else:
            listing = self.api.list_namespaced_pod(self.namespace, **kwargs)
        # As on the wire (camelCase), as a kubelet reads it.
        items = self.api.api_client.sanitize_for_serialization(listing)["items"]
        live = {
            f"{p['metadata']['namespace']}/{p['metadata']['name']}": p
            for p in items
            if not p["metadata"].get("deletionTimestamp")
        }
        with self._lock:
            gone = [
                key
                for key, p in self.pods.items()
                if key not in live or live[key]["metadata"]["uid"] != p.uid
            ]
            stopping = [self.pods.pop(key) for key in gone]
        for p in stopping:  # in the background: a draining engine may take its grace period
            threading.Thread(target=self._terminate, args=(p,), daemon=True).start()
        for key, pod in live.items():
            with self._lock:
                running = self.pods.get(key)
            if running is None:
                if (pod.get("status") or {}).get("phase") in ("Failed", "Succeeded"):
                    continue
                running = self._launch(pod)
            self._report(running)

    def _launch(self, pod: dict[str, Any]) -> PodProcess:
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        n = next(self._ips)
        ip = f"{self.subnet}.{n // 250}.{n % 250 + 1}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", **self.env}
        for var in pod["spec"]["containers"][0].get("env") or []:
            if var.get("value") is not None:
                env[var["name"]] = var["value"]
        env["HOME"] = os.environ.get("HOME", "/tmp")  # the pod's emptyDir /tmp is ours to share
        cmd = pod_command(pod, ip, self.commands)
        log_path = self.log_dir / f"{namespace}_{name}.log"
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=child_setup_factory(),
            )
        grace = pod["spec"].get("terminationGracePeriodSeconds")
        container = pod["spec"]["containers"][0]
        running = PodProcess(
            namespace=namespace,
            name=name,
            uid=pod["metadata"]["uid"],
            ip=ip,
            proc=proc,
            log_path=log_path,
            probe=readiness_probe(pod),
            grace_s=30.0 if grace is None else float(grace),
            container=container.get("name", "main"),
            image=container.get("image", ""),
            message_policy=container.get("terminationMessagePolicy", "File"),
        )
        with self._lock:
            self.pods[f"{namespace}/{name}"] = running
        log.info("started pod %s/%s on %s: %s", namespace, name, ip, " ".join(cmd))
        self._patch(running, phase="Running", ready=False)
        return running

    def _report(self, p: PodProcess) -> None:
        if p.failed:
            return
        if p.proc.poll() is not None:
            p.failed, p.ready = True, False
            log.warning("pod %s exited with %s:\n%s", p.name, p.proc.returncode, p.log_tail())
            self._patch(p, phase="Failed", ready=False)
            return
        ready = p.probe is None or probe_ok(p.ip, p.probe)
        if ready != p.ready:
            p.ready = ready
            self._patch(p, phase="Running", ready=ready)

    def _patch(self, p: PodProcess, *, phase: str, ready: bool) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        flag = "True" if ready else "False"
        conditions = [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": flag, "lastTransitionTime": now},
            {"type": "Ready", "status": flag, "lastTransitionTime": now},
        ]
        running = phase == "Running"
        state = {"running": {"startedAt": now}} if running else {"terminated": self._ended(p, now)}
        status = {
            "phase": phase,
            "podIP": p.ip,
            "podIPs": [{"ip": p.ip}],
            "hostIP": "127.0.0.1",
            "startTime": now,
            "conditions": conditions,
            # What `kubectl get pods` shows in READY and RESTARTS.
            "containerStatuses": [
                {
                    "name": p.container,
                    "ready": ready,
                    "started": running,
                    "restartCount": 0,
                    "image": p.image,
                    "imageID": "",
                    "state": state,
                }
            ],
        }
        with contextlib.suppress(Exception):  # the pod may be gone already
            self.api.patch_namespaced_pod_status(p.name, p.namespace, {"status": status})

    @staticmethod
    def _ended(p: PodProcess, now: str) -> dict[str, Any]:
        """A terminated state as a kubelet writes it; with FallbackToLogsOnError and a failed
        exit, the message is the log's tail (at most 80 lines and 2048 bytes)."""
        code = p.proc.returncode or 0
        ended: dict[str, Any] = {
            "exitCode": code,
            "reason": "Error" if code else "Completed",
            "finishedAt": now,
        }
        if code and p.message_policy == "FallbackToLogsOnError":
            tail = p.log_tail(80)
            ended["message"] = tail.encode()[-2048:].decode(errors="ignore")
        return ended

    def _terminate(self, p: PodProcess) -> None:
        if p.proc.poll() is None:
            signal_group(p.proc, signal.SIGTERM)
            try:
                p.proc.wait(timeout=p.grace_s)
            except subprocess.TimeoutExpired:
                signal_group(p.proc, signal.SIGKILL)
                p.proc.wait(timeout=10)
        log.info("stopped pod %s (exit %s)", p.name, p.proc.returncode)
