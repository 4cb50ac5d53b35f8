"""The quickstart with every pod a container: `Stack(containers=True)` (what `kvpilot up
--containers` runs) builds kvpilot's images (cached), points the operator at them, and the node
agent runs the engine and router pods with podman from the images their specs name, read-only,
as uid/gid 65532, without capabilities. The LLMService comes up Ready and answers a chat through
its router, so the pod specs the operator writes are proved against the images."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from kvpilot_operator.images.runtime import IMAGE_UID, container_env
from kvpilot_operator.local.stack import SAMPLE, Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_quickstart_in_containers(tmp_path: Path) -> None:
    from kvpilot_operator.images.build import build
    from kvpilot_operator.images.runtime import podman_run_args
    from kvpilot_operator.packaged import source_tree
    from openai import OpenAI

    # The routers run `kvpilot router` from the operator image, which has no torch by design.
    root = source_tree()
    assert root is not None
    operator = build(("operator", "engine-cpu"), root=root)["operator"]
    probe = subprocess.run(
        podman_run_args(operator, command=["router", "--help"]),
        env=container_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert probe.returncode == 0, f"`kvpilot router` in the operator image:\n{probe.stderr}"

    with Stack(workdir=tmp_path / "stack", sample=SAMPLE, containers=True) as stack:
        url = stack.router_url(stack.sample_name())
        assert url is not None
        reply = OpenAI(base_url=url, api_key="unused").chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=8,
            temperature=0,
        )
        assert reply.choices[0].message.content
        svc = stack.get("llmservice", stack.sample_name()) or {}
        assert (svc.get("status") or {}).get("readyReplicas") == 1

        env = container_env()
        names = subprocess.run(
            ["podman", "ps", "--format", "{{.Names}}"], env=env, capture_output=True,
            text=True, check=True,
        ).stdout.split()  # fmt: skip
        ours = [n for n in names if n.startswith("kvpilot-default-smollm2-chat-")]
        inspected = json.loads(
            subprocess.run(
                ["podman", "inspect", *ours], env=env, capture_output=True, text=True, check=True
            ).stdout
        )
        images = {c["ImageName"] for c in inspected}
        assert images == {stack.images["engine-cpu"], stack.images["operator"]}
        for c in inspected:
            assert c["Config"]["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
            assert c["HostConfig"]["ReadonlyRootfs"] is True
            assert not c.get("EffectiveCaps")
    # Stopped with the stack: no container of the service is left.
    left = subprocess.run(
        ["podman", "ps", "-a", "--format", "{{.Names}}"], env=container_env(),
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert not [n for n in left if n.startswith("kvpilot-default-smollm2-chat-")]
