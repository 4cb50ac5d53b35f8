"""A throwaway local Prometheus on loopback, for the tests and for users without a cluster. Its
binaries come from Debian's `prometheus` package, unpacked into the kvpilot cache rather than
installed (the package's maintainer scripts create a system user and a service).

    with LocalPrometheus() as prom:
        prom.set_targets([("127.0.0.1:8000", {"namespace": "ns1", "llmservice": "svc"})])
        prom.wait_for_series('up{llmservice="svc"} == 1')

`python -m kvpilot_operator.local.prometheus up` starts one and keeps it running until interrupted.
"""

from __future__ import annotations

import argparse
import atexit
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from kvpilot_operator.local.cluster import missing_binaries
from kvpilot_operator.local.procs import (
    STOP_GRACE_S,
    cache_dir,
    child_setup_factory,
    free_ports,
    run_until_signalled,
    scratch_dir,
    signal_group,
)

PROMETHEUS_VERSION = "2.42.0"
# Any patch release of this series will do: what Debian ships as its security updates.
PROMETHEUS_SERIES = PROMETHEUS_VERSION.rsplit(".", 1)[0]
PROMETHEUS_BINARIES = ("prometheus", "promtool")
DEBIAN_PACKAGE = "prometheus"
JOB_NAME = "kvpilot"
DEFAULT_START_TIMEOUT_S = 60.0
# Generous: a cold `apt-get update` on a slow mirror is the long pole.
_APT_TIMEOUT_S = 600.0


def prometheus_home() -> Path:
    """The cache entry ensure_prometheus() fills: bin/ (the binaries) and web/ (the classic UI's
    templates, which Debian's build reads from disk instead of embedding)."""
    return cache_dir() / f"prometheus-{PROMETHEUS_VERSION}"


def _major_minor(text: str) -> tuple[int, int] | None:
    m = re.search(r"version (\d+)\.(\d+)\.", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


_WANTED = _major_minor(f"version {PROMETHEUS_SERIES}.0")


def _binary_major_minor(binary: Path) -> tuple[int, int] | None:
    try:
        proc = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return _major_minor(proc.stdout + proc.stderr)


def _system_bin_dir() -> Path | None:
    """The dir of an installed prometheus whose promtool sits next to it and whose version is
    ours up to the patch level; None when there is no such install."""
    found = shutil.which("prometheus")
    if not found:
        return None
    bin_dir = Path(found).parent
    if (
        missing_binaries(bin_dir, PROMETHEUS_BINARIES)
        or _binary_major_minor(bin_dir / "prometheus") != _WANTED
    ):
        return None
    return bin_dir


def _run(cmd: Sequence[str | Path], cwd: Path | None = None) -> str:
    """Run a packaging command; RuntimeError carrying its stderr when it fails."""
    argv = [str(c) for c in cmd]
    try:
        proc = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, timeout=_APT_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"`{' '.join(argv)}` failed: {e}") from e
    if proc.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(argv)}` failed with exit status {proc.returncode}:\n"
            f"{(proc.stderr or proc.stdout).strip()}"
        )
    return proc.stdout


def _apt_download(dest: Path) -> Path:
    """Download (not install) the package's .deb into dest; return its path."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(
                f"fetching prometheus needs {tool} (Debian/Ubuntu); elsewhere, point "
                "KVPILOT_PROMETHEUS_BIN at a dir holding prometheus and promtool "
                f"{PROMETHEUS_SERIES}.x"
            )
    download = ["apt-get", "download", DEBIAN_PACKAGE]
    try:
        _run(download, cwd=dest)
    except RuntimeError as first:
        # Most often stale or absent package lists (a fresh container); refreshing them needs
        # root and the network, so it is only tried when the plain download did not work.
        try:
            _run(["apt-get", "update"])
        except RuntimeError as update:
            raise RuntimeError(
                f"{first}\nand refreshing the package lists failed: {update}"
            ) from None
        _run(download, cwd=dest)
    debs = sorted(dest.glob(f"{DEBIAN_PACKAGE}_*.deb"))
    if len(debs) != 1:
        raise RuntimeError(f"`{' '.join(download)}` left {debs or 'no .deb'} in {dest}")
    return debs[0]


def _fill_cache(home: Path, progress: bool) -> None:
    home.parent.mkdir(parents=True, exist_ok=True)
    # Staged next to the cache entry, so that the final rename is atomic: an interrupted fill
    # leaves a tmp dir behind, never a half-filled entry.
    staging = Path(tempfile.mkdtemp(prefix=f"{home.name}.tmp-", dir=home.parent))
    try:
        if progress:
            print(
                f"kvpilot: fetching Debian's {DEBIAN_PACKAGE} package into {home} (once)",
                file=sys.stderr,
                flush=True,
            )
        deb = _apt_download(staging)
        version = _run(["dpkg-deb", "--field", deb, "Version"]).strip()
        root = staging / "root"
        _run(["dpkg-deb", "-x", deb, root])
        new = staging / "entry"
        (new / "bin").mkdir(parents=True)
        for name in PROMETHEUS_BINARIES:
            shutil.copy2(root / "usr" / "bin" / name, new / "bin" / name)
        web = root / "usr" / "share" / "prometheus" / "web"
        if web.is_dir():
            # Its vendored JS libraries are absolute symlinks into /usr/share/javascript: they
            # resolve where Debian's libjs-* packages are installed, and the API needs none.
            shutil.copytree(web, new / "web", symlinks=True)
        got = _binary_major_minor(new / "bin" / "prometheus")
        if got != _WANTED:
            raise RuntimeError(
                f"the {DEBIAN_PACKAGE} package this machine's apt offers is {version}, not "
                f"{PROMETHEUS_SERIES}.x; point KVPILOT_PROMETHEUS_BIN at a dir holding "
                "prometheus and promtool of that version"
            )
        (new / "DEB_VERSION").write_text(version + "\n")
        shutil.rmtree(home, ignore_errors=True)
        os.replace(new, home)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def ensure_prometheus(progress: bool = True) -> Path:
    """Return a dir holding the prometheus and promtool binaries: $KVPILOT_PROMETHEUS_BIN
    (only checked), else the kvpilot cache, else an installed prometheus of the same
    major.minor, else the cache after filling it from Debian's package (seconds, once)."""
    override = os.environ.get("KVPILOT_PROMETHEUS_BIN")
    if override:
        bin_dir = Path(override)
        missing = missing_binaries(bin_dir, PROMETHEUS_BINARIES)
        if missing:
            raise RuntimeError(f"KVPILOT_PROMETHEUS_BIN={bin_dir} lacks {', '.join(missing)}")
        return bin_dir
    home = prometheus_home()
    bin_dir = home / "bin"
    if not missing_binaries(bin_dir, PROMETHEUS_BINARIES):
        return bin_dir
    system = _system_bin_dir()
    if system is not None:
        return system
    lock_path = home.parent / f"{home.name}.ensure.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    # Parallel test sessions must not download into the same cache at once; whoever waited
    # finds the entry filled.
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if missing_binaries(bin_dir, PROMETHEUS_BINARIES):
            _fill_cache(home, progress)
    missing = missing_binaries(bin_dir, PROMETHEUS_BINARIES)
    if missing:
        raise RuntimeError(f"{bin_dir} lacks {', '.join(missing)} after filling the cache")
    return bin_dir


# --- the server --------------------------------------------------------------------------------


class PrometheusStartError(RuntimeError):
    pass


class PrometheusQueryError(RuntimeError):
    pass


def _duration(seconds: float) -> str:
    # Prometheus durations take no fractions ("1.5s" is invalid); milliseconds are exact enough.
    ms = round(seconds * 1000)
    if ms <= 0:
        raise ValueError(f"interval must be at least 1 ms, got {seconds}s")
    return f"{ms}ms"


def kubernetes_pods_job(sd_url: str) -> dict[str, Any]:
    """The usual `kubernetes-pods` scrape job: pods annotated prometheus.io/scrape, at their
    prometheus.io/port and /path, with `namespace`, `pod` and every pod label (sanitised:
    kvpilot.io/llmservice -> kvpilot_io_llmservice) as target labels. These are the labels the
    autoscaler, the rollout controller, the chart's rules and the dashboard select on.

    Debian builds Prometheus without kubernetes_sd_configs, so the pods come from
    `KubernetesPodSD` over http_sd with kubernetes_sd's own `__meta_kubernetes_pod_*` labels:
    the relabelling below is the one a cluster's Prometheus uses."""
    meta = "__meta_kubernetes_pod_"
    return {
        "job_name": "kubernetes-pods",
        "http_sd_configs": [{"url": sd_url, "refresh_interval": "2s"}],
        "relabel_configs": [
            {
                "source_labels": [f"{meta}annotation_prometheus_io_scrape"],
                "action": "keep",
                "regex": "true",
            },
            {
                "source_labels": [f"{meta}phase"],
                "action": "drop",
                "regex": "Pending|Succeeded|Failed",
            },
            {
                "source_labels": [f"{meta}annotation_prometheus_io_path"],
                "target_label": "__metrics_path__",
                "regex": "(.+)",
            },
            {
                "source_labels": [f"{meta}ip", f"{meta}annotation_prometheus_io_port"],
                "regex": "(.+);(.+)",
                "replacement": "$1:$2",
                "target_label": "__address__",
            },
            {"action": "labelmap", "regex": f"{meta}label_(.+)"},
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": [f"{meta}name"], "target_label": "pod"},
        ],
    }


def _sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def pod_sd_groups(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """http_sd target groups carrying what kubernetes_sd (role: pod) says of each pod."""
    groups = []
    for pod in pods:
        meta, status = pod["metadata"], pod.get("status") or {}
        ip = status.get("podIP")
        if not ip:
            continue
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions") or []
        )
        labels = {
            "__meta_kubernetes_namespace": meta["namespace"],
            "__meta_kubernetes_pod_name": meta["name"],
            "__meta_kubernetes_pod_ip": ip,
            "__meta_kubernetes_pod_phase": status.get("phase") or "",
            "__meta_kubernetes_pod_ready": "true" if ready else "false",
        }
        for key, value in (meta.get("labels") or {}).items():
            labels[f"__meta_kubernetes_pod_label_{_sanitize(key)}"] = value
        for key, value in (meta.get("annotations") or {}).items():
            labels[f"__meta_kubernetes_pod_annotation_{_sanitize(key)}"] = value
        groups.append({"targets": [ip], "labels": labels})
    return groups


class KubernetesPodSD:
    """An http_sd endpoint on loopback listing a cluster's pods (see kubernetes_pods_job)."""

    def __init__(self, kubeconfig: Path) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from kubernetes import client, config

        api = client.CoreV1Api(config.new_client_from_config(str(kubeconfig)))

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                try:
                    listing = api.list_pod_for_all_namespaces()
                    pods = api.api_client.sanitize_for_serialization(listing)["items"]
                    body = json.dumps(pod_sd_groups(pods)).encode()
                    code = 200
                except Exception as err:  # Prometheus keeps its last good targets on errors
                    body, code = str(err).encode(), 503
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/sd"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class LocalPrometheus:
    """A Prometheus on loopback scraping the targets given to set_targets() as job "kvpilot".
    `start()`/`stop()`, or use it as a context manager; each instance starts once. To simulate
    an outage, stop_process()/start_process() (or restart()) keep the port and the data.

    workdir: holds prometheus.yml, the targets file, the TSDB and prometheus.log. None: a fresh
    tempdir (on /dev/shm when there is one), removed on stop(). A workdir that is given is never
    removed, and data already in it is kept.
    """

    def __init__(
        self,
        scrape_interval: float = 1.0,
        evaluation_interval: float = 1.0,
        rule_files: list[Path] | None = None,
        workdir: Path | None = None,
        *,
        bin_dir: Path | None = None,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
        extra_args: Sequence[str] = (),
        kubeconfig: Path | None = None,
    ) -> None:
        # With a kubeconfig, a second job discovers the cluster's pods as a standard
        # kubernetes-pods job does (prometheus.io/* annotations, pod labels as labels).
        self.kubeconfig = Path(kubeconfig).resolve() if kubeconfig else None
        self._pod_sd: KubernetesPodSD | None = None
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval
        self.rule_files = [Path(p).resolve() for p in rule_files or []]
        self.workdir = workdir
        self.bin_dir = bin_dir
        self.start_timeout_s = start_timeout_s
        self.extra_args = list(extra_args)
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._targets: list[tuple[str, dict[str, str]]] = []
        self._owns_workdir = False
        self._started = False
        self._stopped = False
        self._lock = threading.Lock()

    # --- public API ----------------------------------------------------------------------------

    def __enter__(self) -> LocalPrometheus:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("LocalPrometheus has no port before start()")
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self._wd() / "prometheus.yml"

    @property
    def targets_path(self) -> Path:
        return self._wd() / "targets.json"

    @property
    def data_dir(self) -> Path:
        return self._wd() / "data"

    @property
    def log_path(self) -> Path:
        return self._wd() / "prometheus.log"

    @property
    def pid(self) -> int | None:
        """The pid of the current process, or of the last one once it is stopped."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> LocalPrometheus:
        """Write the config, start the server and wait until it is ready."""
        with self._lock:
            if self._started:
                raise RuntimeError("a LocalPrometheus starts only once; make a new one")
            self._started = True
        if self.bin_dir is None:
            self.bin_dir = ensure_prometheus()
        missing = missing_binaries(self.bin_dir, PROMETHEUS_BINARIES)
        if missing:
            raise PrometheusStartError(f"{self.bin_dir} lacks {', '.join(missing)}")
        if self.workdir is None:
            self.workdir = scratch_dir("kvpilot-prom-")
            self._owns_workdir = True
        else:
            self.workdir = Path(self.workdir).resolve()
            self.workdir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)
        try:
            self.port = free_ports(1)[0]
            if self.kubeconfig is not None:
                self._pod_sd = KubernetesPodSD(self.kubeconfig)
            self._write_targets()
            self.config_path.write_text(json.dumps(self._config(), indent=2) + "\n")
            self.start_process()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Terminate the server and remove the workdir if start() created it. Idempotent; also
        runs at interpreter exit."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        atexit.unregister(self.stop)
        self.stop_process()
        if self._pod_sd is not None:
            self._pod_sd.close()
        if self._owns_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def stop_process(self) -> None:
        """Terminate the server (SIGTERM, SIGKILL after a grace period) but keep its port, config
        and data, so start_process() brings it back as it was."""
        proc = self._proc
        if proc is None:
            return
        signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            signal_group(proc, signal.SIGKILL)
            proc.wait()
        # Anything it forked lives in its group; leave none behind.
        signal_group(proc, signal.SIGKILL)

    def start_process(self) -> None:
        """(Re)start the server on the same port and data; return once it is ready."""
        if not self._started or self._stopped:
            raise RuntimeError("start_process() is for a started, not yet stopped LocalPrometheus")
        if self.running:
            raise RuntimeError(f"prometheus is already running (pid {self.pid})")
        assert self.bin_dir is not None
        args = [
            str(self.bin_dir / "prometheus"),
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.data_dir}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",
            "--storage.tsdb.retention.time=1h",
        ]
        web = self.bin_dir.parent / "web"
        if web.is_dir():
            # The cache's copy of the UI templates; a system install finds its own.
            args.append(f"--web.local-assets={web}/")
        args += self.extra_args
        # Appended to, so that the log of a run before a restart survives it.
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                # Not start_new_session: prctl has to run in the child too.
                preexec_fn=child_setup_factory(),
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop_process()
            raise

    def restart(self) -> None:
        self.stop_process()
        self.start_process()

    def reload(self) -> None:
        """Re-read prometheus.yml and the rule files (POST /-/reload)."""
        req = urllib.request.Request(f"{self.url}/-/reload", method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()

    def set_targets(self, targets: Sequence[tuple[str, dict[str, str]]]) -> None:
        """Scrape exactly these ("host:port", labels) targets. Prometheus notices the change
        through inotify, and takes up to ~10 s to act on it (its discovery and scrape managers
        each batch updates on a 5 s tick)."""
        self._targets = [(addr, dict(labels)) for addr, labels in targets]
        if self.workdir is not None and self._started and not self._stopped:
            self._write_targets()

    def log_tail(self, n: int = 25) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except (OSError, RuntimeError) as e:
            return f"(cannot read the log: {e})"
        return "\n".join(lines[-n:])

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result: for a vector, one {"metric", "value"} dict per series;
        a scalar or string comes back as one such dict with empty labels."""
        body = self._api("/api/v1/query", {"query": promql})
        data = body["data"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        """The active targets with their scrape health (/api/v1/targets)."""
        active: list[dict[str, Any]] = self._api("/api/v1/targets", {"state": "active"})["data"][
            "activeTargets"
        ]
        return active

    def wait_for_series(self, promql: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll the query until its result is non-empty, and return it."""
        deadline = time.monotonic() + timeout
        last_error = ""
        while True:
            if not self.running:
                raise PrometheusStartError(
                    f"prometheus is not running while waiting for {promql!r}\n{self.log_tail()}"
                )
            try:
                result = self.query(promql)
                if result:
                    return result
            except (OSError, PrometheusQueryError) as e:
                last_error = f"; last error: {e}"
            if time.monotonic() > deadline:
                try:
                    health = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in self.targets()]
                except (OSError, PrometheusQueryError) as e:
                    health = [("?", "?", str(e))]
                raise TimeoutError(
                    f"no series for {promql!r} after {timeout:.0f}s{last_error}; targets: {health}"
                )
            time.sleep(0.2)

    # --- internals -----------------------------------------------------------------------------

    def _wd(self) -> Path:
        if self.workdir is None:
            raise RuntimeError("LocalPrometheus has no workdir before start()")
        return Path(self.workdir)

    def _config(self) -> dict[str, Any]:
        # JSON is valid YAML; no YAML library needed.
        return {
            "global": {
                "scrape_interval": _duration(self.scrape_interval),
                "evaluation_interval": _duration(self.evaluation_interval),
            },
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {
                    "job_name": JOB_NAME,
                    "file_sd_configs": [
                        {"files": [str(self.targets_path)], "refresh_interval": "1s"}
                    ],
                },
                *([kubernetes_pods_job(self._pod_sd.url)] if self._pod_sd else []),
            ],
        }

    def _write_targets(self) -> None:
        groups = [{"targets": [addr], "labels": labels} for addr, labels in self._targets]
        # Atomic, so that Prometheus never reads a half-written file and drops every target.
        fd, tmp = tempfile.mkstemp(prefix=".targets-", suffix=".json", dir=self._wd())
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(groups, f, indent=2)
            os.replace(tmp, self.targets_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _api(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            # Bad queries come back as 4xx with the reason in a JSON body.
            raw = e.read()
            if not raw:
                raise PrometheusQueryError(f"GET {url}: HTTP {e.code}") from e
        try:
            body: dict[str, Any] = json.loads(raw)
        except ValueError as e:
            raise PrometheusQueryError(f"GET {url}: not JSON: {raw[:200]!r}") from e
        if body.get("status") != "success":
            raise PrometheusQueryError(
                f"GET {url}: {body.get('errorType', '?')}: {body.get('error', body)}"
            )
        return body

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            rc = self._proc.poll()
            if rc is not None:
                raise PrometheusStartError(
                    f"prometheus exited with status {rc} before it was ready; its log ends:\n"
                    f"{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                # Not listening yet, or 503 while the TSDB replays its WAL.
                pass
            if time.monotonic() > deadline:
                raise PrometheusStartError(
                    f"prometheus not ready after {self.start_timeout_s:.0f}s; its log ends:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)


# --- CLI ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kvpilot_operator.local.prometheus",
        description="A local Prometheus on loopback.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a Prometheus and keep it running until interrupted")
    up.add_argument("--workdir", type=Path, default=None, help="default: a fresh tempdir")
    up.add_argument("--scrape-interval", type=float, default=1.0, help="seconds (default 1)")
    up.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a /metrics endpoint to scrape; repeatable (more later: edit the targets file)",
    )
    up.add_argument("--rule-file", action="append", type=Path, default=[], help="repeatable")
    args = parser.parse_args(argv)

    if args.command == "up":
        ensure_prometheus(progress=True)
        prom = LocalPrometheus(
            scrape_interval=args.scrape_interval,
            rule_files=args.rule_file,
            workdir=args.workdir,
        )
        prom.set_targets([(t, {}) for t in args.target])
        with prom:
            print(f"url:      {prom.url}")
            print(f"targets:  {prom.targets_path}")
            print(f"workdir:  {prom.workdir}")
            print("Ctrl-C to stop", flush=True)
            return run_until_signalled(
                lambda: None if prom.running else f"prometheus exited:\n{prom.log_tail()}"
            )
    return 2


if __name__ == "__main__":
    sys.exit(main())
