"""Run `kvpilot serve` as a process on loopback, wait for it, and read its /metrics."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

MODEL = "smollm2"
MAX_MODEL_LEN = 512
READY_TIMEOUT_S = 180.0  # model load plus warmup, on 2 busy cores


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def run_server(log_path: Path, *extra: str) -> Iterator[Server]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "kvpilot_engine.cli", "serve", MODEL,
        "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port),
        "--kv-cache-memory", "64MiB", "--max-model-len", str(MAX_MODEL_LEN),
        *extra,
    ]  # fmt: skip
    # One thread: on 2 shared cores, spinning OpenMP threads make every step several times slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = Server(proc, port, log_path)
    try:
        wait_ready(server)
        yield server
    finally:
        stop(proc, grace=30)


def stop(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM (the process drains and exits), SIGKILL after `grace` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_ready(
    server: Server, what: str = "kvpilot serve", timeout: float = READY_TIMEOUT_S
) -> None:
    """Until /ready answers 200; fails with the log's tail if the process exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"{what} exited with {server.proc.returncode}:\n{server.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    pytest.fail(f"{what} not ready after {timeout:g}s:\n{server.log_tail()}")


def samples(text: str) -> dict[str, float]:
    """Prometheus text as {'name{label="v",...}': value}, labels in sorted order."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def scrape(base_url: str) -> dict[str, float]:
    """/metrics as samples()."""
    return samples(httpx.get(f"{base_url}/metrics", timeout=10).text)


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    labels = {"model_name": MODEL, **labels}
    key = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    return samples[key]


def wait_idle(base_url: str, timeout: float = 30.0) -> dict[str, float]:
    """Until nothing runs or waits and the KV cache is empty; returns the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(base_url)
        idle = (
            metric(m, "vllm:kv_cache_usage_perc") == 0.0
            and metric(m, "vllm:num_requests_running") == 0
            and metric(m, "vllm:num_requests_waiting") == 0
        )
        if idle:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"server not idle after {timeout}s: {m}")
        time.sleep(0.1)
