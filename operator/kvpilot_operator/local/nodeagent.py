"""A stand-in for a kubelet on a machine without a container runtime: runs a namespace's pods as
local processes.

Each pod gets its own loopback address (127.x.y.z), so every pod can listen on its container
port as it would in a cluster. The container's command and args come from the pod spec (a
`--host` argument is pointed at the pod's address; `kvpilot` is this Python's `kvpilot`). The
agent reports what a kubelet would: phase Running, podIP, and the Ready condition from the
container's HTTP readiness probe; a process that exits turns its pod Failed. Init containers
run first, one after the other (a failed one fails the pod, with its termination message); emptyDir
and PersistentVolumeClaim volumes are local folders (a claim's shared by every pod naming it), and
arguments and env values under a mount path, or naming the termination message file, point there;
env from a Secret is read as a kubelet reads it (a missing one: CreateContainerConfigError).
Pods that disappear
(the local control plane has no nodes, so unbound pods are deleted at once) get SIGTERM, then
SIGKILL after their grace period.

This is for tests and the one-machine quickstart only; it has none of a kubelet's isolation. In
container mode (`containers=True`, `kvpilot up --containers`) each container runs instead with
podman from the image the pod names, read-only and as the pod's user as its securityContext says,
its volumes mounted from the same local folders (local/containers.py builds the command line).
"""

from __future__ import annotations

import base64
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
    # Init containers: those still to run (the main container runs after them), the statuses of
    # those done, the running one's name, and the termination message file of the running one.
    pending_init: list[dict[str, Any]] = field(default_factory=list)
    init_statuses: list[dict[str, Any]] = field(default_factory=list)
    running_init: str | None = None
    pod: dict[str, Any] = field(default_factory=dict)
    message_path: Path | None = None
    container_name: str | None = None  # container mode: the podman container now running

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def pod_command(pod: dict[str, Any], ip: str, commands: dict[str, list[str]]) -> list[str]:
    """The first container's command and args, bound to `ip`."""
    return container_command(pod["spec"]["containers"][0], ip, commands)


def container_command(
    container: dict[str, Any], ip: str, commands: dict[str, list[str]]
) -> list[str]:
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


# Container mode: where a pod finds the agent's credentials (a service account token's stand-in).
SERVICE_ACCOUNT_DIR = "/var/run/kvpilot"


def write_credentials(kubeconfig: Path, folder: Path, owner: tuple[int, int], mount: str) -> None:
    """The agent's kubeconfig for a container: its embedded certificates as files under `mount`,
    because the Kubernetes client writes embedded ones to temporary files, which a read-only root
    filesystem without a /tmp volume refuses (in a cluster the token and CA are files too)."""
    import json

    config = json.loads(kubeconfig.read_text())  # the local cluster's kubeconfigs are JSON
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        ("clusters", "cluster", "certificate-authority"): "ca.crt",
        ("users", "user", "client-certificate"): "client.crt",
        ("users", "user", "client-key"): "client.key",
    }
    for (section, inner, key), filename in files.items():
        for entry in config.get(section) or []:
            data = entry.get(inner, {}).pop(f"{key}-data", None)
            if data is not None:
                (folder / filename).write_bytes(base64.b64decode(data))
                entry[inner][key] = f"{mount}/{filename}"
    (folder / "kubeconfig").write_text(json.dumps(config))
    for path in [folder, *folder.iterdir()]:
        os.chown(path, *owner)
        path.chmod(0o500 if path.is_dir() else 0o400)


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
    # Run each container with podman from its image (`kvpilot images build`), honouring its
    # securityContext, instead of as a local process (local/containers.py).
    containers: bool = False

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
            if running is not None:  # None: waiting (a missing Secret), tried again next sync
                self._report(running)

    def _volume_dirs(self, pod: dict[str, Any]) -> dict[str, Path]:
        """The pod's emptyDir and PersistentVolumeClaim volumes as local folders."""
        meta = pod["metadata"]
        own = self.log_dir / "volumes" / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"
        dirs: dict[str, Path] = {}
        for vol in pod["spec"].get("volumes") or []:
            if "emptyDir" in vol:
                dirs[vol["name"]] = own / vol["name"]
            elif "persistentVolumeClaim" in vol:
                claim = vol["persistentVolumeClaim"]["claimName"]
                dirs[vol["name"]] = self.log_dir / "claims" / meta["namespace"] / claim
        return dirs

    def _secret_env(self, namespace: str, var: dict[str, Any]) -> str | None:
        """A secretKeyRef's value, read as a kubelet reads it; None when optional and absent.
        Raises LookupError (-> CreateContainerConfigError) when required and absent."""
        from kubernetes.client.exceptions import ApiException

        ref = var["valueFrom"]["secretKeyRef"]
        try:
            secret = self.api.read_namespaced_secret(ref["name"], namespace)
        except ApiException as e:
            if e.status != 404:
                raise
            if ref.get("optional"):
                return None
            raise LookupError(f'secret "{ref["name"]}" not found') from e
        data = secret.data or {}
        if ref["key"] not in data:
            if ref.get("optional"):
                return None
            raise LookupError(f"couldn't find key {ref['key']} in Secret {namespace}/{ref['name']}")
        return base64.b64decode(data[ref["key"]]).decode()

    def _start(self, p: PodProcess, container: dict[str, Any], *, init: bool) -> None:
        """Run one of the pod's containers (an init container, or the main one) as p's process."""
        if self.containers:
            self._start_container(p, container, init=init)
            return
        pod = p.pod
        env = {**os.environ, "OMP_NUM_THREADS": "1", **self.env}
        dirs = self._volume_dirs(pod)
        mounts = {
            m["mountPath"].rstrip("/"): dirs[m["name"]]
            for m in container.get("volumeMounts") or []
            if m["name"] in dirs and m["mountPath"] != "/tmp"  # /tmp: the host's, as before
        }
        for d in mounts.values():
            d.mkdir(parents=True, exist_ok=True)
        message_file = str(container.get("terminationMessagePath") or "/dev/termination-log")
        suffix = f".{container.get('name', 'init')}" if init else ""
        p.message_path = self.log_dir / f"{p.namespace}_{p.name}{suffix}.termination"
        p.message_path.unlink(missing_ok=True)

        def local(value: str) -> str:
            if value == message_file:
                return str(p.message_path)
            for path, d in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
                if value == path or value.startswith(path + "/"):
                    return str(d) + value[len(path) :]
            return value

        for var in container.get("env") or []:
            if var.get("value") is not None:
                env[var["name"]] = local(var["value"])
            elif "secretKeyRef" in (var.get("valueFrom") or {}):
                value = self._secret_env(p.namespace, var)
                if value is not None:
                    env[var["name"]] = value
        env["HOME"] = os.environ.get("HOME", "/tmp")  # the pod's emptyDir /tmp is ours to share
        cmd = [local(a) for a in container_command(container, p.ip, self.commands)]
        p.log_path = self.log_dir / f"{p.namespace}_{p.name}{suffix}.log"
        with p.log_path.open("ab") as out:
            p.proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=child_setup_factory(),
            )
        p.container = container.get("name", "main")
        p.image = container.get("image", "")
        p.message_policy = container.get("terminationMessagePolicy", "File")
        p.running_init = p.container if init else None
        log.info("started %s of pod %s/%s on %s: %s", p.container, p.namespace, p.name, p.ip,
                 " ".join(cmd))  # fmt: skip

    def _start_container(self, p: PodProcess, container: dict[str, Any], *, init: bool) -> None:
        """Container mode: `podman run` in the foreground as p's process (signals reach the
        container through podman's proxy; `_terminate` removes what a SIGKILL leaves)."""
        from kvpilot_operator.images.runtime import container_env
        from kvpilot_operator.local.containers import podman_argv, security

        pod = p.pod
        sc = security(pod, container)
        owner = (int(sc.get("runAsUser") or 0), int(pod["spec"].get("securityContext", {}).get(
            "fsGroup", sc.get("runAsGroup") or 0)))  # fmt: skip
        dirs = self._volume_dirs(pod)
        mounts: dict[str, str] = {}
        for m in container.get("volumeMounts") or []:
            if m["name"] in dirs:
                d = dirs[m["name"]]
                d.mkdir(parents=True, exist_ok=True)
                os.chown(d, *owner)  # fsGroup: the volume is the pod user's to write
                mounts[m["mountPath"].rstrip("/") or "/"] = str(d)
        suffix = f".{container.get('name', 'init')}" if init else ""
        p.message_path = self.log_dir / f"{p.namespace}_{p.name}{suffix}.termination"
        p.message_path.write_text("")
        os.chown(p.message_path, *owner)
        message_file = str(container.get("terminationMessagePath") or "/dev/termination-log")
        mounts[message_file] = str(p.message_path)
        values: dict[str, str] = {"OMP_NUM_THREADS": "1"}
        for var in container.get("env") or []:
            if var.get("value") is not None:
                values[var["name"]] = var["value"]
            elif "secretKeyRef" in (var.get("valueFrom") or {}):
                value = self._secret_env(p.namespace, var)
                if value is not None:
                    values[var["name"]] = value
        read_only: dict[str, str] = {}
        kubeconfig = self.env.get("KUBECONFIG")
        if kubeconfig and pod["spec"].get("automountServiceAccountToken") is not False:
            # The stand-in for a service account token, readable by the pod's user.
            folder = self.log_dir / f"{p.namespace}_{p.name}.credentials"
            write_credentials(Path(kubeconfig), folder, owner, SERVICE_ACCOUNT_DIR)
            read_only[SERVICE_ACCOUNT_DIR] = str(folder)
            values["KUBECONFIG"] = f"{SERVICE_ACCOUNT_DIR}/kubeconfig"
        name = f"kvpilot-{p.namespace}-{p.name}{suffix.replace('.', '-')}"[:120]
        args = container_command(container, p.ip, {})
        cmd = podman_argv(pod, container, name=name, args=args, env_names=sorted(values),
                          mounts=mounts, read_only_mounts=read_only)  # fmt: skip
        p.log_path = self.log_dir / f"{p.namespace}_{p.name}{suffix}.log"
        with p.log_path.open("ab") as out:
            p.proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**container_env(), **values},
                preexec_fn=child_setup_factory(),
            )
        p.container_name = name
        p.container = container.get("name", "main")
        p.image = container.get("image", "")
        p.message_policy = container.get("terminationMessagePolicy", "File")
        p.running_init = p.container if init else None
        log.info("started container %s of pod %s/%s on %s: %s", p.container, p.namespace,
                 p.name, p.ip, " ".join(cmd))  # fmt: skip

    def _launch(self, pod: dict[str, Any]) -> PodProcess | None:
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        n = next(self._ips)
        ip = f"{self.subnet}.{n // 250}.{n % 250 + 1}"
        grace = pod["spec"].get("terminationGracePeriodSeconds")
        inits = list(pod["spec"].get("initContainers") or [])
        running = PodProcess(
            namespace=namespace,
            name=name,
            uid=pod["metadata"]["uid"],
            ip=ip,
            proc=None,  # type: ignore[arg-type]  # set by _start
            log_path=self.log_dir / f"{namespace}_{name}.log",
            probe=readiness_probe(pod),
            grace_s=30.0 if grace is None else float(grace),
            pending_init=inits[1:],
            pod=pod,
        )
        try:
            if inits:
                self._start(running, inits[0], init=True)
            else:
                self._start(running, pod["spec"]["containers"][0], init=False)
        except LookupError as e:  # a missing Secret: the pod waits, as a kubelet's does
            first = inits[0] if inits else pod["spec"]["containers"][0]
            self._waiting(pod, ip, first, "CreateContainerConfigError", str(e), init=bool(inits))
            return None
        with self._lock:
            self.pods[f"{namespace}/{name}"] = running
        self._patch(running, phase="Pending" if inits else "Running", ready=False)
        return running

    def _waiting(
        self, pod: dict[str, Any], ip: str, container: dict[str, Any], reason: str, message: str,
        *, init: bool,
    ) -> None:  # fmt: skip
        state = {"waiting": {"reason": reason, "message": message}}
        cs = {"name": container.get("name", "main"), "ready": False, "restartCount": 0,
              "image": container.get("image", ""), "imageID": "", "state": state}  # fmt: skip
        status: dict[str, Any] = {"phase": "Pending", "podIP": ip, "hostIP": "127.0.0.1"}
        status["initContainerStatuses" if init else "containerStatuses"] = [cs]
        with contextlib.suppress(Exception):
            self.api.patch_namespaced_pod_status(
                pod["metadata"]["name"], pod["metadata"]["namespace"], {"status": status}
            )

    def _next_container(self, p: PodProcess) -> None:
        """An init container exited 0: record it, then run the next one or the main container."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        p.init_statuses.append(self._container_status(p, now, ready=False))
        nxt = p.pending_init.pop(0) if p.pending_init else None
        try:
            if nxt is not None:
                self._start(p, nxt, init=True)
            else:
                self._start(p, p.pod["spec"]["containers"][0], init=False)
        except LookupError as e:
            p.failed = True
            container = nxt or p.pod["spec"]["containers"][0]
            self._waiting(p.pod, p.ip, container, "CreateContainerConfigError", str(e),
                          init=nxt is not None)  # fmt: skip
            return
        self._patch(p, phase="Pending" if nxt is not None else "Running", ready=False)

    def _report(self, p: PodProcess) -> None:
        if p.failed:
            return
        if p.running_init is not None and p.proc.poll() == 0:
            self._next_container(p)
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
        initializing = p.running_init is not None
        init_statuses = p.init_statuses
        if initializing:  # running, or failed (then the main container never started)
            init_statuses = [*init_statuses, self._container_status(p, now, ready=False)]
        if initializing:
            main = p.pod["spec"]["containers"][0]
            conditions[1]["status"] = "False"
            status_init: dict[str, Any] = {
                "phase": "Failed" if phase == "Failed" else "Pending",
                "podIP": p.ip,
                "podIPs": [{"ip": p.ip}],
                "hostIP": "127.0.0.1",
                "startTime": now,
                "conditions": conditions,
                "initContainerStatuses": init_statuses,
                "containerStatuses": [
                    {
                        "name": main.get("name", "main"),
                        "ready": False,
                        "started": False,
                        "restartCount": 0,
                        "image": main.get("image", ""),
                        "imageID": "",
                        "state": {"waiting": {"reason": "PodInitializing"}},
                    }
                ],
            }
            with contextlib.suppress(Exception):
                self.api.patch_namespaced_pod_status(p.name, p.namespace, {"status": status_init})
            return
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
        if init_statuses:
            status["initContainerStatuses"] = init_statuses
        with contextlib.suppress(Exception):  # the pod may be gone already
            self.api.patch_namespaced_pod_status(p.name, p.namespace, {"status": status})

    def _container_status(self, p: PodProcess, now: str, *, ready: bool) -> dict[str, Any]:
        done = p.proc.poll() is not None
        state = {"terminated": self._ended(p, now)} if done else {"running": {"startedAt": now}}
        return {
            "name": p.container,
            "ready": ready,
            "started": not done,
            "restartCount": 0,
            "image": p.image,
            "imageID": "",
            "state": state,
        }

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
        written = ""
        if p.message_path is not None:
            with contextlib.suppress(OSError):
                written = p.message_path.read_text(errors="replace")[:4096]
        if written:  # what the container wrote to its terminationMessagePath
            ended["message"] = written
        elif code and p.message_policy == "FallbackToLogsOnError":
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
        if p.container_name is not None:  # a killed podman client leaves its container running
            from kvpilot_operator.images.runtime import container_env

            subprocess.run(["podman", "rm", "-f", "-t", "0", p.container_name],
                           env=container_env(), capture_output=True, check=False)  # fmt: skip
        log.info("stopped pod %s (exit %s)", p.name, p.proc.returncode)
