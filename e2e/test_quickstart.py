"""The README's main command, as a user runs it: `kvpilot up` returns with an OpenAI base URL
that answers, and `kvpilot down` leaves no process behind."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from kvpilot_operator.local.stack import STACK_ENV

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def kvpilot(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvpilot_engine.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_kvpilot_up_prints_a_working_url_and_down_stops_everything(tmp_path: Path) -> None:
    workdir = tmp_path / "stack"
    up = kvpilot("up", "--workdir", str(workdir))
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        match = re.search(r"OpenAI base URL: (http://\S+/v1)", up.stdout)
        assert match, up.stdout
        body = json.dumps(
            {
                "model": "smollm2",
                "messages": [{"role": "user", "content": "Say hello."}],
                "max_tokens": 8,
            }
        ).encode()
        req = urllib.request.Request(
            f"{match.group(1)}/chat/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            reply = json.load(resp)
        assert reply["choices"][0]["message"]["content"]
        state = json.loads((workdir / "state.json").read_text())
        assert state["status"] == "ready"
        again = kvpilot("up", "--workdir", str(workdir))
        assert again.returncode == 0 and "already running" in again.stdout
    finally:
        down = kvpilot("down", "--workdir", str(workdir), timeout=180)
    assert down.returncode == 0 and "kvpilot is down" in down.stdout, down.stdout + down.stderr
    supervisor = state["pid"]
    with pytest.raises(ProcessLookupError):
        os.kill(supervisor, 0)
    # Nothing the stack started survives it: control plane, Prometheus, operator, pods.
    time.sleep(1)
    marker = f"{STACK_ENV}={workdir}".encode()
    leftovers = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "environ").read_bytes().split(b"\0"):
                leftovers.append((proc / "cmdline").read_bytes().replace(b"\0", b" ")[:120])
        except OSError:  # gone meanwhile, or not ours to read
            continue
    assert leftovers == []
    assert kvpilot("down", "--workdir", str(workdir)).stdout.strip() == "kvpilot is not running"
