"""An engine that cannot start says why on its LLMService: the real operator and API server, the
node agent (this machine's kubelet stand-in) running the engine pod as a process, and a model
path that does not exist. The engine logs the reason and exits; the pod's termination message
(FallbackToLogsOnError: the log's tail) carries it; the operator reports Degraded=EngineFailing
with it, instead of leaving a silent crash loop."""

from __future__ import annotations

from pathlib import Path

import pytest
from kvpilot_operator.local.cluster import LocalCluster
from kvpilot_operator.local.nodeagent import NodeAgent

from tests.support.kube import apply, condition, get, running_operator, service_doc, wait_for

pytestmark = pytest.mark.slow


def test_a_missing_model_is_reported_on_the_service(
    cluster: LocalCluster, ns: str, tmp_path: Path
) -> None:
    with running_operator(cluster, tmp_path / "operator.log"):
        agent = NodeAgent(
            cluster.kubeconfig, ns, tmp_path / "pods", env={"KUBECONFIG": str(cluster.kubeconfig)}
        ).start()
        try:
            doc = service_doc("broken", model={"source": {"path": "/no/such/model.gguf"}})
            apply(cluster, doc, ns)

            def failing() -> dict | None:
                cond = condition(get(cluster, "llmservice", "broken", ns), "Degraded")
                return cond if cond.get("reason") == "EngineFailing" else None

            cond = wait_for("Degraded=EngineFailing", failing, timeout=90)
            assert cond["status"] == "True"
            assert "exited with code" in cond["message"]
            assert "'/no/such/model.gguf' is neither a local path" in cond["message"], cond
        finally:
            cluster.kubectl("delete", "llmservice", "broken", "-n", ns, "--wait=true", check=False)
            agent.stop()
