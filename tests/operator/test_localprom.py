"""The local Prometheus is a real one: it discovers targets from set_targets(), scrapes them with
their labels, survives a restart with its port and data, and stop() leaves nothing behind."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from kvpilot_operator.local.prometheus import (
    PROMETHEUS_VERSION,
    LocalPrometheus,
    PrometheusQueryError,
    ensure_prometheus,
)
from prometheus_client import CollectorRegistry, Counter

from tests.support.metrics import serving

pytestmark = pytest.mark.slow  # every test here starts processes

LABELS = {"namespace": "ns1", "llmservice": "svc"}


@pytest.fixture(scope="module")
def bin_dir() -> Path:
    return ensure_prometheus()


@pytest.fixture
def metrics_endpoint() -> Iterator[str]:
    """A /metrics endpoint on loopback serving kvpilot_test_requests_total = 3."""
    registry = CollectorRegistry()
    Counter(
        "kvpilot_test_requests", "Requests, for the local Prometheus test.", registry=registry
    ).inc(3)
    with serving(registry) as target:
        yield target


def gone(pid: int) -> bool:
    """Neither the process nor anything in its process group is left."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_promtool_runs(bin_dir: Path) -> None:
    proc = subprocess.run(
        [str(bin_dir / "promtool"), "--version"], capture_output=True, text=True, check=True
    )
    assert f"version {PROMETHEUS_VERSION}" in proc.stdout + proc.stderr


def test_scrapes_targets_with_labels_and_stops_clean(bin_dir: Path, metrics_endpoint: str) -> None:
    prom = LocalPrometheus(bin_dir=bin_dir).start()
    try:
        assert prom.url == f"http://127.0.0.1:{prom.port}"
        prom.set_targets([(metrics_endpoint, LABELS)])
        series = prom.wait_for_series('kvpilot_test_requests_total{llmservice="svc"}', timeout=20)
        assert len(series) == 1
        assert series[0]["metric"] == {
            "__name__": "kvpilot_test_requests_total",
            "job": "kvpilot",
            "instance": metrics_endpoint,
            **LABELS,
        }
        assert float(series[0]["value"][1]) == 3.0
        assert prom.query("1 + 1")[0]["value"][1] == "2"
        with pytest.raises(PrometheusQueryError, match="parse error"):
            prom.query("sum(")

        # An outage: the process goes, and comes back on the same port with its data.
        port, url = prom.port, prom.url
        first_pid = prom.pid
        assert first_pid is not None
        prom.stop_process()
        assert not prom.running and gone(first_pid) and not listening(port)
        with pytest.raises(OSError):
            prom.query("up")
        prom.start_process()
        assert prom.url == url and prom.pid != first_pid
        assert prom.query('kvpilot_test_requests_total{namespace="ns1"}')
    finally:
        prom.stop()
    pid, workdir = prom.pid, prom.workdir
    assert pid is not None and workdir is not None
    assert gone(pid)
    assert not listening(port)
    assert not workdir.exists()
    prom.stop()  # idempotent


def test_given_workdir_is_kept(bin_dir: Path, tmp_path: Path) -> None:
    with LocalPrometheus(workdir=tmp_path / "prom", bin_dir=bin_dir) as prom:
        assert prom.targets_path.read_text().strip() == "[]"
        prom.set_targets([("127.0.0.1:1", {"a": "b"})])
        assert '"a": "b"' in prom.targets_path.read_text()
    assert prom.log_path.is_file() and prom.data_dir.is_dir()
    assert "Server is ready" in prom.log_tail(50)
