"""A throwaway local Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager and
kube-scheduler on loopback, with their own PKI. For the operator's tests and for users without a
cluster. There is no kubelet: pods are scheduled nowhere and stay Pending.

    with LocalCluster() as c:
        c.kubectl("apply", "-f", "-", input=manifest)

`python -m kvpilot_operator.local.cluster up` starts one and keeps it running until interrupted.
"""

from __future__ import annotations

import argparse
import atexit
import fcntl
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from kvpilot_operator.local.pki import generate_pki, kubeconfig
from kvpilot_operator.local.procs import (
    STOP_GRACE_S,
    cache_dir,
    child_setup_factory,
    free_ports,
    run_until_signalled,
    scratch_dir,
    signal_group,
)

if TYPE_CHECKING:
    # Imported where used: the rest of the module (kube_bin_dir, ensure_binaries) works without it.
    pass

KUBE_VERSION = "1.20.2"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
SERVICE_CIDR = "10.96.0.0/16"
ADMINS = ("admin", "operator", "router")
# Every request's metadata, once it is answered (watches: when they end).
AUDIT_POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived", "ResponseStarted"]
rules:
  - level: Metadata
"""
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc"
DEFAULT_START_TIMEOUT_S = 120.0


def kube_bin_dir() -> Path:
    """Where the control plane's binaries live: $KVPILOT_KUBE_BIN, else the build script's cache."""
    override = os.environ.get("KVPILOT_KUBE_BIN")
    if override:
        return Path(override)
    return cache_dir() / f"kube-{KUBE_VERSION}" / "bin"


def missing_binaries(bin_dir: Path, names: Sequence[str] = BINARIES) -> list[str]:
    return [b for b in names if not os.access(bin_dir / b, os.X_OK)]


def ensure_binaries(progress: bool = True) -> Path:
    """Make sure the binaries are there and current, building them with build_kube.sh if not
    (minutes, once); return the bin dir. A KVPILOT_KUBE_BIN override is only checked."""
    if os.environ.get("KVPILOT_KUBE_BIN"):
        bin_dir = kube_bin_dir()
        missing = missing_binaries(bin_dir)
        if missing:
            raise RuntimeError(f"KVPILOT_KUBE_BIN={bin_dir} lacks {', '.join(missing)}")
        return bin_dir
    script = Path(__file__).with_name("build_kube.sh")
    # The script is always run: it alone knows whether the cache is current (its recipe stamp),
    # and when it is the script exits at once.
    lock_path = cache_dir() / f"kube-{KUBE_VERSION}.ensure.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    # Parallel test sessions must not run two builds into the same cache at once. A name of its
    # own, so that a lock the script might take itself can never deadlock against this one.
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.run(
            ["bash", str(script)],
            stdout=None if progress else subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
        )
    if proc.returncode != 0:
        tail = "" if progress else "\n" + "\n".join(proc.stdout.splitlines()[-40:])
        raise RuntimeError(f"{script} failed with exit status {proc.returncode}{tail}")
    bin_dir = kube_bin_dir()
    missing = missing_binaries(bin_dir)
    if missing:
        raise RuntimeError(f"{bin_dir} lacks {', '.join(missing)} after running {script}")
    return bin_dir


@dataclass
class _Component:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, n: int = 25) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError as e:
            return f"(cannot read {self.log_path}: {e})"
        return "\n".join(lines[-n:])


class ClusterStartError(RuntimeError):
    pass


class KubectlError(subprocess.CalledProcessError):
    """CalledProcessError whose message carries kubectl's stderr, which is where the reason is."""

    def __str__(self) -> str:
        err = (self.stderr or "").strip()
        return f"{super().__str__()}\n{err}" if err else super().__str__()


# eq=False: a cluster is an owner of processes, equal only to itself (and hashable).
@dataclass(eq=False)
class LocalCluster:
    """A control plane on loopback. `start()`/`stop()`, or use it as a context manager; each
    instance starts once.

    workdir: holds the PKI, kubeconfigs, etcd's data and one log file per component. None: a
    fresh tempdir (on /dev/shm when there is one), removed on stop() unless keep=True or the start
    failed (its logs are what the error points at). A workdir that is given is never removed; its
    etcd data is wiped at start, since it would not match the new PKI.
    """

    workdir: Path | None = None
    keep: bool = False
    bin_dir: Path | None = None
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S
    # Log every request's metadata to workdir/audit.log (JSON lines), to count who asks what.
    audit: bool = False

    server: str = field(init=False, default="")
    kubeconfig: Path = field(init=False, default=Path())
    # Admin kubeconfigs by identity: "admin" (as `kubeconfig`), "operator", "router".
    kubeconfigs: dict[str, Path] = field(init=False, default_factory=dict)
    startup_s: float = field(init=False, default=0.0)
    # Seconds from the start of start() at which each start-up milestone was reached.
    timings: dict[str, float] = field(init=False, default_factory=dict)
    ports: dict[str, int] = field(init=False, default_factory=dict)
    _components: list[_Component] = field(init=False, default_factory=list, repr=False)
    _owns_workdir: bool = field(init=False, default=False, repr=False)
    _pki: dict[str, Path] = field(init=False, default_factory=dict, repr=False)
    _stopped: bool = field(init=False, default=False, repr=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock, repr=False)

    # --- public API ----------------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pids(self) -> list[int]:
        return [c.proc.pid for c in self._components]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        return env

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        bin_dir = self.bin_dir or kube_bin_dir()
        cmd = [str(bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args]
        proc = subprocess.run(cmd, input=input, text=True, capture_output=True, check=False)
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def exited(self) -> list[str]:
        """Names of the components that are no longer running."""
        return [c.name for c in self._components if c.proc.poll() is not None]

    def log_tails(self, n: int = 25) -> str:
        return "\n".join(
            f"--- {c.name} ({c.log_path}, {self._state(c)}) ---\n{c.log_tail(n)}"
            for c in self._components
        )

    def start(self) -> LocalCluster:
        t0 = time.monotonic()
        if self._components or self._stopped:
            raise RuntimeError("a LocalCluster starts only once; make a new one")
        bin_dir = self.bin_dir or kube_bin_dir()
        missing = missing_binaries(bin_dir)
        if missing:
            raise ClusterStartError(
                f"{bin_dir} lacks {', '.join(missing)}; call ensure_binaries() first"
            )
        self.bin_dir = bin_dir
        if self.workdir is None:
            self.workdir = scratch_dir("kvpilot-cluster-")
            self._owns_workdir = True
        else:
            self.workdir = Path(self.workdir).resolve()
            self.workdir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.workdir / "etcd", ignore_errors=True)
        atexit.register(self.stop)
        try:
            self._start(t0)
        except BaseException:
            # Keep the logs of a failed start: the error message points at them.
            self.keep = True
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Terminate every component (SIGTERM, SIGKILL after a grace period) and wait for it.
        Idempotent; also runs at interpreter exit."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        atexit.unregister(self.stop)
        crashed = self.exited()
        if crashed and self._owns_workdir and not self.keep:
            # A component that died on its own is a bug to chase: keep what its log says.
            self.keep = True
            print(
                f"kvpilot local cluster: {', '.join(crashed)} exited before stop(); "
                f"keeping {self.workdir}",
                file=sys.stderr,
            )
        # Clients first, etcd (the first started) last: an apiserver whose etcd vanished spends
        # its shutdown retrying it and flooding its log.
        tiers = [self._components[1:], self._components[:1]]
        for tier in tiers:
            for c in tier:
                signal_group(c.proc, signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE_S
            for c in tier:
                try:
                    c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    signal_group(c.proc, signal.SIGKILL)
                    c.proc.wait()
                # Anything the component forked lives in its group; leave none behind.
                signal_group(c.proc, signal.SIGKILL)
        if self._owns_workdir and not self.keep and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # --- start-up ------------------------------------------------------------------------------

    def _audit_args(self, wd: Path) -> list[str]:
        if not self.audit:
            return []
        policy = wd / "audit-policy.yaml"
        policy.write_text(AUDIT_POLICY)
        return [
            f"--audit-policy-file={policy}",
            f"--audit-log-path={wd / 'audit.log'}",
            "--audit-log-format=json",
            "--audit-log-mode=blocking",
        ]

    @property
    def audit_log(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "audit.log"

    def _start(self, t0: float) -> None:
        assert self.workdir is not None and self.bin_dir is not None
        wd = self.workdir
        names = ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler")
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.server = f"https://127.0.0.1:{self.ports['apiserver']}"
        pki = self._pki = generate_pki(wd / "pki")
        self.timings["pki"] = time.monotonic() - t0

        self.kubeconfig = wd / "admin.kubeconfig"
        kubeconfigs = {"admin": self.kubeconfig}
        for role in ("controller-manager", "scheduler", "operator", "router"):
            kubeconfigs[role] = wd / f"{role}.kubeconfig"
        for role, path in kubeconfigs.items():
            path.write_text(
                kubeconfig(
                    self.server, pki["ca.crt"], pki[f"{role}.crt"], pki[f"{role}.key"], role
                )
            )
            path.chmod(0o600)
        self.kubeconfigs = {k: v for k, v in kubeconfigs.items() if k in ADMINS}

        etcd_url = f"http://127.0.0.1:{self.ports['etcd']}"
        peer_url = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        self._spawn(
            "etcd",
            [
                "--name=default",
                f"--data-dir={wd / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                "--initial-cluster-state=new",
                "--logger=zap",
                "--log-level=warn",
            ],
        )
        self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers={etcd_url}",
                f"--secure-port={self.ports['apiserver']}",
                # No --insecure-port: 1.20 serves none any more and warns that the flag is a no-op.
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                # Endpoints may not hold loopback addresses, so the `kubernetes` Service's
                # endpoints cannot be reconciled; not reconciling keeps the log free of errors.
                "--endpoint-reconciler-type=none",
                "--authorization-mode=Node,RBAC",
                f"--client-ca-file={pki['ca.crt']}",
                f"--tls-cert-file={pki['apiserver.crt']}",
                f"--tls-private-key-file={pki['apiserver.key']}",
                f"--kubelet-client-certificate={pki['apiserver-kubelet-client.crt']}",
                f"--kubelet-client-key={pki['apiserver-kubelet-client.key']}",
                # The aggregation layer. Without a request-header CA the controller-manager and
                # scheduler also log errors about the missing extension-apiserver-authentication
                # client CA every few seconds.
                f"--requestheader-client-ca-file={pki['front-proxy-ca.crt']}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={pki['front-proxy-client.crt']}",
                f"--proxy-client-key-file={pki['front-proxy-client.key']}",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki['sa.pub']}",
                f"--service-account-signing-key-file={pki['sa.key']}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                "--profiling=false",
                *self._audit_args(wd),
            ],
        )
        # The controller-manager gives up if the apiserver is not healthy within 10 s of its
        # start, which 2 busy cores can exceed: start it (and the scheduler) once the apiserver
        # answers.
        self._wait("kube-apiserver /readyz", self._apiserver_ready)
        self.timings["apiserver-ready"] = time.monotonic() - t0
        for comp in ("controller-manager", "scheduler"):
            common = [
                f"--kubeconfig={kubeconfigs[comp]}",
                f"--authentication-kubeconfig={kubeconfigs[comp]}",
                f"--authorization-kubeconfig={kubeconfigs[comp]}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports[comp]}",
                # 1.20 still serves an insecure port (10251/10252) unless told not to.
                "--port=0",
                "--profiling=false",
            ]
            if comp == "controller-manager":
                common += [
                    f"--service-account-private-key-file={pki['sa.key']}",
                    f"--root-ca-file={pki['ca.crt']}",
                    "--use-service-account-credentials=true",
                    # With per-controller credentials every controller's start makes a few
                    # requests; at the default 20 QPS that alone takes ~4 s.
                    "--kube-api-qps=500",
                    "--kube-api-burst=1000",
                    "--controllers=*",
                    f"--cluster-signing-cert-file={pki['ca.crt']}",
                    f"--cluster-signing-key-file={pki['ca.key']}",
                ]
            self._spawn(f"kube-{comp}", common)
        self._wait("the default ServiceAccount and its token", self._default_sa_ready)
        self.timings["default-serviceaccount"] = time.monotonic() - t0
        self._wait("kube-scheduler /healthz", self._scheduler_healthy)
        self.timings["scheduler-healthy"] = time.monotonic() - t0
        self.startup_s = time.monotonic() - t0

    def _spawn(self, name: str, args: list[str]) -> None:
        assert self.workdir is not None and self.bin_dir is not None
        log_path = self.workdir / f"{name}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [str(self.bin_dir / name), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                # Not start_new_session: prctl has to run in the child too.
                preexec_fn=child_setup_factory(),
            )
        self._components.append(_Component(name, proc, log_path))

    def _wait(self, what: str, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            for c in self._components:
                if c.proc.poll() is not None:
                    raise ClusterStartError(
                        f"{c.name} exited with status {c.proc.returncode} while waiting for "
                        f"{what}; workdir {self.workdir}\n{self.log_tails()}"
                    )
            if ready():
                return
            if time.monotonic() > deadline:
                raise ClusterStartError(
                    f"timed out after {self.start_timeout_s:.0f}s waiting for {what}; "
                    f"workdir {self.workdir}\n{self.log_tails()}"
                )
            time.sleep(0.1)

    @staticmethod
    def _state(c: _Component) -> str:
        rc = c.proc.poll()
        return "running" if rc is None else f"exited {rc}"

    # --- probes --------------------------------------------------------------------------------

    def _admin_ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self._pki["ca.crt"]))
        ctx.load_cert_chain(str(self._pki["admin.crt"]), str(self._pki["admin.key"]))
        return ctx

    def _get(self, url: str, ctx: ssl.SSLContext) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (OSError, ssl.SSLError):
            return 0, b""

    def _apiserver_ready(self) -> bool:
        status, body = self._get(f"{self.server}/readyz", self._admin_ssl())
        return status == 200 and body.strip() == b"ok"

    def _default_sa_ready(self) -> bool:
        # Before BoundServiceAccountTokenVolume (beta in 1.21) the ServiceAccount admission
        # plugin rejects pods until the account's token Secret exists, so wait for that too.
        url = f"{self.server}/api/v1/namespaces/default/serviceaccounts/default"
        status, body = self._get(url, self._admin_ssl())
        if status != 200:
            return False
        return bool(json.loads(body).get("secrets"))

    def _scheduler_healthy(self) -> bool:
        # Serves a self-signed cert of its own making; /healthz is open to anyone.
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        status, _ = self._get(f"https://127.0.0.1:{self.ports['scheduler']}/healthz", ctx)
        return status == 200


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kvpilot_operator.local.cluster",
        description="A local Kubernetes control plane (no nodes) on loopback.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a cluster and keep it running until interrupted")
    up.add_argument("--workdir", type=Path, default=None, help="default: a fresh tempdir")
    up.add_argument("--keep", action="store_true", help="keep the workdir after stopping")
    args = parser.parse_args(argv)

    if args.command == "up":
        ensure_binaries(progress=True)
        with LocalCluster(workdir=args.workdir, keep=args.keep) as c:
            print(f"server:     {c.server}")
            print(f"kubeconfig: {c.kubeconfig}")
            print(f"workdir:    {c.workdir}")
            print(f"started in {c.startup_s:.1f}s; Ctrl-C to stop", flush=True)
            print(f"export KUBECONFIG={c.kubeconfig}", flush=True)

            def died() -> str | None:
                dead = c.exited()
                return f"{', '.join(dead)} exited:\n{c.log_tails()}" if dead else None

            return run_until_signalled(died)
    return 2


if __name__ == "__main__":
    sys.exit(main())
