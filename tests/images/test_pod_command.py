"""The node agent's container mode maps the operator's pod specs onto `podman run` (fast: a pure
function of the rendered manifests; tests/images and e2e/test_containers.py run the results)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kvpilot_operator.local.containers import ContainerConfigError, podman_argv

ROOT = Path(__file__).resolve().parents[2]


def _pods() -> dict[str, dict]:
    from kvpilot_operator.api.policies import load_presets, parse, resolve_spec
    from kvpilot_operator.controller.manifests import RenderOptions, render

    doc = yaml.safe_load((ROOT / "docs" / "examples" / "quickstart.yaml").read_text())
    svc = parse(doc)
    svc.metadata.namespace = "default"
    policy = load_presets()[svc.spec.policy].spec
    opts = RenderOptions(engine_image="localhost/kvpilot/engine:0.1.0-cpu",
                         router_image="localhost/kvpilot/operator:0.1.0")  # fmt: skip
    return {
        d["metadata"]["name"]: {"spec": d["spec"]["template"]["spec"]}
        for d in render(svc, resolve_spec(svc.spec, policy), opts)
        if d["kind"] == "Deployment"
    }


def test_engine_pod_runs_read_only_as_its_user_without_capabilities() -> None:
    pod = _pods()["smollm2-chat-engine"]
    engine = pod["spec"]["containers"][0]
    argv = podman_argv(
        pod, engine, name="e", args=["kvpilot", "serve", "smollm2"], env_names=["HOME"],
        mounts={"/tmp": "/var/lib/pods/e/tmp"},
    )  # fmt: skip
    joined = " ".join(argv)
    assert "--user 65532:65532" in joined
    assert "--read-only --read-only-tmpfs=false" in joined
    assert "--cap-drop ALL" in joined and "--security-opt no-new-privileges" in joined
    assert "--volume /var/lib/pods/e/tmp:/tmp" in joined
    assert "--pull never" in joined and "--network host" in joined
    assert argv[-3:] == ["localhost/kvpilot/engine:0.1.0-cpu", "serve", "smollm2"]
    assert argv[argv.index("--entrypoint") + 1] == "kvpilot"


def test_router_pod_uses_the_operator_image() -> None:
    pod = _pods()["smollm2-chat-router"]
    router = pod["spec"]["containers"][0]
    argv = podman_argv(pod, router, name="r", args=["kvpilot", "router"], env_names=[], mounts={})
    assert argv[-2:] == ["localhost/kvpilot/operator:0.1.0", "router"]


def test_run_as_root_is_refused_when_non_root_is_required() -> None:
    pod = _pods()["smollm2-chat-engine"]
    pod["spec"]["securityContext"]["runAsUser"] = 0
    with pytest.raises(ContainerConfigError, match="runAsUser 0"):
        podman_argv(pod, pod["spec"]["containers"][0], name="e", args=[], env_names=[], mounts={})
