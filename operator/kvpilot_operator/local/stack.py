"""The whole system on one machine: `kvpilot up` / `kvpilot down`.

A local control plane (etcd, kube-apiserver, controller-manager, scheduler), the CRDs and the
ServingPolicy presets, a Prometheus that discovers the pods through the API server and loads
the chart's rules, `kvpilot operator` (autoscaler and rollouts on), the node agent (this
machine's kubelet stand-in: pods run as local processes on loopback addresses), and a sample
LLMService serving SmolLM2 behind its router. `kvpilot up` starts it in the background and
returns with the OpenAI base URL; `kvpilot down` stops it and leaves no process behind.

`Stack` is also what the end-to-end test drives.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvpilot_operator.local.cluster import LocalCluster, ensure_binaries
from kvpilot_operator.local.nodeagent import NodeAgent
from kvpilot_operator.local.procs import cache_dir, child_setup_factory, free_ports, signal_group
from kvpilot_operator.local.prometheus import LocalPrometheus, ensure_prometheus
from kvpilot_operator.observability.files import RULES_PATH
from kvpilot_operator.packaged import packaged

SAMPLE = packaged("examples") / "quickstart.yaml"
POLICIES = packaged("policies")
STATE_FILE = "state.json"
STACK_ENV = "KVPILOT_STACK"
READY_TIMEOUT_S = 600.0

Progress = Callable[[str], None]


def default_workdir() -> Path:
    return cache_dir() / "stack"


@dataclass
class Stack:
    workdir: Path = field(default_factory=default_workdir)
    sample: Path | None = SAMPLE
    namespace: str = "default"
    autoscale_interval: float = 5.0
    rollout_interval: float = 2.0
    scrape_interval: float = 2.0
    # Pods as podman containers from kvpilot's images (built first, cached) instead of processes.
    containers: bool = False

    cluster: LocalCluster | None = field(init=False, default=None)
    prometheus: LocalPrometheus | None = field(init=False, default=None)
    operator: subprocess.Popen[bytes] | None = field(init=False, default=None)
    agent: NodeAgent | None = field(init=False, default=None)
    operator_metrics_port: int = field(init=False, default=0)
    images: dict[str, str] = field(init=False, default_factory=dict)

    # Each step: (what the progress bar says, the method).
    def steps(self) -> list[tuple[str, Callable[[], None]]]:
        out = [("container images (kvpilot images build, cached)", self._build_images)]
        out = out if self.containers else []
        out += [
            ("control plane (etcd, kube-apiserver 1.20, controllers)", self._start_cluster),
            ("CRDs and ServingPolicy presets", self._apply_api),
            ("Prometheus (pods discovered through the API server, chart rules)", self._start_prom),
            ("kvpilot operator (autoscaler, rollouts)", self._start_operator),
            (
                "node agent (pods as podman containers)"
                if self.containers
                else "node agent (pods as local processes)",
                self._start_agent,
            ),
        ]
        if self.sample is not None:
            out += [
                (f"LLMService from {self.sample.name}", self._apply_sample),
                ("engine ready (SmolLM2 loads and warms up)", self._wait_ready),
            ]
        return out

    def start(self, progress: Progress | None = None) -> Stack:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            for what, step in self.steps():
                if progress is not None:
                    progress(what)
                step()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Everything down, pods first (their engines drain), the control plane last."""
        if self.agent is not None:
            self.agent.stop()
            self.agent = None
        if self.operator is not None:
            signal_group(self.operator, signal.SIGTERM)
            try:
                self.operator.wait(timeout=20)
            except subprocess.TimeoutExpired:
                signal_group(self.operator, signal.SIGKILL)
                self.operator.wait()
            self.operator = None
        if self.prometheus is not None:
            self.prometheus.stop()
            self.prometheus = None
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what a user and the e2e test ask ----------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        assert self.cluster is not None
        return self.cluster.kubeconfig

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        assert self.cluster is not None
        return self.cluster.kubectl(*args, input=input, check=check).stdout

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        out = self.kubectl(
            "get", kind, name, "-n", namespace or self.namespace, "-o", "json", check=False
        )
        return json.loads(out) if out.strip() else None

    def router_url(self, service: str, namespace: str | None = None) -> str | None:
        """http://<router pod IP>:8000/v1 of a ready router (no kube-proxy here: the Service's
        ClusterIP is not routable, the pod's loopback address is)."""
        out = self.kubectl(
            "get", "pods", "-n", namespace or self.namespace,
            "-l", f"kvpilot.io/llmservice={service},app.kubernetes.io/component=router",
            "-o", "json",
        )  # fmt: skip
        for pod in json.loads(out)["items"]:
            st = pod.get("status") or {}
            ready = any(
                c["type"] == "Ready" and c["status"] == "True" for c in st.get("conditions") or []
            )
            if ready and st.get("podIP"):
                return f"http://{st['podIP']}:8000/v1"
        return None

    def sample_name(self) -> str:
        assert self.sample is not None
        return str(yaml.safe_load(self.sample.read_text())["metadata"]["name"])

    # --- steps -------------------------------------------------------------------------------

    def _start_cluster(self) -> None:
        ensure_binaries(progress=False)
        self.cluster = LocalCluster(workdir=self.workdir / "cluster").start()

    def _apply_api(self) -> None:
        # --validate=false: kubectl 1.20 does not know the CRDs' CEL rules (x-kubernetes-
        # validations, for 1.25+ clusters); its API server keeps them and checks the rest.
        self.kubectl("apply", "--validate=false", "-f", str(packaged("crds")))
        self.kubectl(
            "wait", "--for=condition=Established", "--timeout=60s",
            "crd/llmservices.kvpilot.io", "crd/servingpolicies.kvpilot.io",
        )  # fmt: skip
        self.kubectl("apply", "-f", str(POLICIES))

    def _start_prom(self) -> None:
        ensure_prometheus(progress=False)
        self.operator_metrics_port = free_ports(1)[0]
        self.prometheus = LocalPrometheus(
            scrape_interval=self.scrape_interval,
            evaluation_interval=self.scrape_interval,
            rule_files=[RULES_PATH],
            workdir=self.workdir / "prometheus",
            kubeconfig=self.kubeconfig,
        )
        # The operator runs as a local process, not a pod: a static target.
        self.prometheus.set_targets([(f"127.0.0.1:{self.operator_metrics_port}", {})])
        self.prometheus.start()

    def _build_images(self) -> None:
        from kvpilot_operator.images.build import build
        from kvpilot_operator.packaged import source_tree

        root = source_tree()
        if root is None:
            raise RuntimeError("--containers builds kvpilot's images: run it from a checkout")
        self.images = build(("operator", "engine-cpu"), root=root)

    def _start_operator(self) -> None:
        assert self.prometheus is not None
        images = []
        if self.containers:  # the pods name the images just built
            images = ["--engine-image", self.images["engine-cpu"],
                      "--router-image", self.images["operator"]]  # fmt: skip
        cmd = [
            sys.executable, "-m", "kvpilot_engine.cli", "operator",
            "--kubeconfig", str(self.kubeconfig),
            "--prometheus-url", self.prometheus.url,
            "--autoscale-interval", str(self.autoscale_interval),
            "--rollout-interval", str(self.rollout_interval),
            "--metrics-port", str(self.operator_metrics_port),
            "--health-port", "0",
            "--log-format", "json",
            *images,
        ]  # fmt: skip
        with (self.workdir / "operator.log").open("ab") as log:
            self.operator = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.cluster.env() if self.cluster else None,
                preexec_fn=child_setup_factory(),
            )

    def _start_agent(self) -> None:
        self.agent = NodeAgent(
            self.kubeconfig,
            None,
            self.workdir / "pods",
            # The routers' stand-in for an in-cluster service account token.
            env={"KUBECONFIG": str(self.kubeconfig)},
            containers=self.containers,
        ).start()

    def _apply_sample(self) -> None:
        assert self.sample is not None
        self.kubectl("apply", "-n", self.namespace, "-f", str(self.sample))

    def _wait_ready(self) -> None:
        name = self.sample_name()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            self._check_alive()
            url = self.router_url(name)
            svc = self.get("llmservice", name) or {}
            if url and (svc.get("status") or {}).get("readyReplicas"):
                with (
                    contextlib.suppress(OSError),
                    urllib.request.urlopen(f"{url}/models", timeout=5) as resp,
                ):
                    if resp.status == 200:
                        return
            time.sleep(1)
        raise TimeoutError(f"{name} was not ready after {READY_TIMEOUT_S:.0f}s; see {self.workdir}")

    def _check_alive(self) -> None:
        if self.operator is not None and self.operator.poll() is not None:
            raise RuntimeError(f"the operator exited; see {self.workdir / 'operator.log'}")
        if self.cluster is not None and self.cluster.exited():
            raise RuntimeError(f"{', '.join(self.cluster.exited())} exited; see {self.workdir}")


# --- `kvpilot up` / `kvpilot down` ----------------------------------------------------------------


def _state_path(workdir: Path) -> Path:
    return workdir / STATE_FILE


def _write_state(workdir: Path, **state: Any) -> None:
    tmp = workdir / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, _state_path(workdir))


def read_state(workdir: Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads(_state_path(workdir).read_text())
        return state
    except (OSError, ValueError):
        return {}


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def run_foreground(workdir: Path, sample: Path | None, containers: bool = False) -> int:
    """The supervisor: start the stack, report progress in state.json, serve until SIGTERM."""
    # Inherited by every process the stack starts: how `kvpilot down`'s test finds leftovers.
    os.environ[STACK_ENV] = str(workdir)
    stack = Stack(workdir=workdir, sample=sample, containers=containers)
    steps = len(stack.steps())
    done = 0

    def progress(what: str) -> None:
        nonlocal done
        _write_state(workdir, pid=os.getpid(), status="starting", step=done, steps=steps, what=what)
        done += 1

    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.start(progress)
        url = stack.router_url(stack.sample_name()) if sample else None
        _write_state(
            workdir,
            pid=os.getpid(),
            status="ready",
            step=steps,
            steps=steps,
            base_url=url,
            kubeconfig=str(stack.kubeconfig),
            prometheus=stack.prometheus.url if stack.prometheus else None,
            model=(yaml.safe_load(sample.read_text())["spec"]["model"].get("servedName"))
            if sample
            else None,
        )
        while True:
            stack._check_alive()
            time.sleep(1)
    except KeyboardInterrupt:
        _write_state(workdir, pid=os.getpid(), status="stopping")
        stack.stop()
        _write_state(workdir, status="stopped")
        return 0
    except BaseException as err:
        _write_state(workdir, status="failed", error=str(err))
        stack.stop()
        raise


def up(workdir: Path, sample: Path | None, containers: bool = False) -> int:
    """Start the supervisor in the background and follow it until the stack is ready."""
    from tqdm import tqdm

    state = read_state(workdir)
    if _alive(state.get("pid")) and state.get("status") in ("starting", "ready"):
        print(f"already running (pid {state['pid']}): {state.get('base_url') or 'starting'}")
        return 0
    workdir.mkdir(parents=True, exist_ok=True)
    _write_state(workdir, status="launching")
    cmd = [
        sys.executable,
        "-m",
        "kvpilot_engine.cli",
        "up",
        "--foreground",
        "--workdir",
        str(workdir),
    ]
    if sample is None:
        cmd.append("--no-sample")
    elif sample != SAMPLE:
        cmd += ["-f", str(sample)]
    if containers:
        cmd.append("--containers")
    with (workdir / "stack.log").open("ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
        )
    t0 = time.monotonic()
    bar = tqdm(total=1, desc="kvpilot up", unit="step", bar_format="{desc}: {n}/{total} {postfix}")
    try:
        while True:
            state = read_state(workdir)
            if state.get("steps"):
                bar.total = state["steps"]
                bar.n = state.get("step", 0)
                bar.set_postfix_str(state.get("what", ""))
                bar.refresh()
            if state.get("status") == "ready":
                break
            if proc.poll() is not None or state.get("status") == "failed":
                bar.close()
                tail = (workdir / "stack.log").read_text(errors="replace").splitlines()[-25:]
                print("\n".join(tail), file=sys.stderr)
                print(
                    f"kvpilot up failed: {state.get('error', 'see ' + str(workdir))}",
                    file=sys.stderr,
                )
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        bar.close()
        down(workdir)
        return 130
    bar.close()
    elapsed = time.monotonic() - t0
    print(f"kvpilot is up in {elapsed:.0f}s (workdir {workdir})")
    if state.get("base_url"):
        print(f"  OpenAI base URL: {state['base_url']}   (model: {state.get('model')})")
        print(
            f"  try: curl -s {state['base_url']}/chat/completions -H 'content-type: "
            f'application/json\' -d \'{{"model": "{state.get("model")}", "messages": '
            '[{"role": "user", "content": "Hi!"}]}\''
        )
    print(f"  kubectl: KUBECONFIG={state.get('kubeconfig')} kubectl get llmservices")
    print(f"  Prometheus: {state.get('prometheus')}")
    print("  stop it all: kvpilot down")
    return 0


def down(workdir: Path, timeout: float = 120.0) -> int:
    state = read_state(workdir)
    pid = state.get("pid")
    if not _alive(pid):
        print("kvpilot is not running")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)
        print(f"kvpilot did not stop in {timeout:.0f}s: killed", file=sys.stderr)
        return 1
    print("kvpilot is down")
    return 0
