"""An engine that cannot start says why on its LLMService: the real operator and API server, the
node agent (this machine's kubelet stand-in) running the engine pod as a process, and a model
path that does not exist, or a speculative draft model of another tokenizer. The engine logs the
reason and exits; the pod's termination message (FallbackToLogsOnError: the log's tail) carries
it; the operator reports Degraded=EngineFailing with it, instead of leaving a silent crash
loop."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from kvpilot_engine.bench.datasets import edit_prompts
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


def test_speculative_service_serves_and_a_foreign_draft_is_reported(
    cluster: LocalCluster, ns: str, tmp_path: Path
) -> None:
    """spec.speculative end to end: an n-gram service comes up Ready with the flag and drafts
    on a prompt it can copy from; a draft model of another tokenizer (a random Qwen3 shape: its
    vocabulary is not SmolLM2's) stops the engine at start, and the service says so, naming
    spec.speculative."""
    engine = {"kvCacheMemory": "64MiB", "maxNumSeqs": 4, "drainTimeoutSeconds": 1}
    small = {"engine": engine, "scaling": {"minReplicas": 1, "maxReplicas": 1}}
    model = {"source": {"path": "smollm2"}, "dtype": "float32", "maxContext": 512}
    ok = service_doc(
        "spec-ok", model=model, quantization="none", speculative={"method": "ngram"}, **small
    )
    foreign = {"source": {"path": "random:qwen3-0.6b"}}
    bad = service_doc(
        "spec-bad",
        model=model,
        quantization="none",
        speculative={"method": "draft_model", "draftModel": foreign},
        **small,
    )
    with running_operator(cluster, tmp_path / "operator.log"):
        agent = NodeAgent(
            cluster.kubeconfig, ns, tmp_path / "pods", env={"KUBECONFIG": str(cluster.kubeconfig)}
        ).start()
        try:
            apply(cluster, ok, ns)
            apply(cluster, bad, ns)

            def failing() -> dict | None:
                cond = condition(get(cluster, "llmservice", "spec-bad", ns), "Degraded")
                return cond if cond.get("reason") == "EngineFailing" else None

            cond = wait_for("spec-bad Degraded=EngineFailing", failing, timeout=120)
            assert "spec.speculative: speculative_config.model" in cond["message"], cond
            assert "does not share the target model's tokenizer" in cond["message"], cond

            wait_for(
                "spec-ok Ready",
                lambda: (
                    (get(cluster, "llmservice", "spec-ok", ns) or {})
                    .get("status", {})
                    .get("readyReplicas")
                ),
                timeout=180,
            )
            deployment = get(cluster, "deployment", "spec-ok-engine", ns) or {}
            args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
            assert json.loads(args[args.index("--speculative-config") + 1]) == {"method": "ngram"}
            pod_ip = cluster.kubectl(
                "get", "pods", "-n", ns, "-l",
                "app.kubernetes.io/component=engine,kvpilot.io/llmservice=spec-ok",
                "-o", "jsonpath={.items[0].status.podIP}",
            ).stdout.strip()  # fmt: skip
            # A text the model copies: the adaptive plan verifies drafts only where its shadow
            # drafts have been borne out (a prompt the model does not continue verbatim would
            # rightly verify none).
            text = edit_prompts(1, chars=600)[0]
            reply = httpx.post(
                f"http://{pod_ip}:8000/v1/completions",
                json={"model": "spec-ok", "prompt": text, "max_tokens": 24, "temperature": 0},
                timeout=60,
            )
            assert reply.status_code == 200, reply.text
            metrics = httpx.get(f"http://{pod_ip}:8000/metrics", timeout=10).text
            drafted = [
                float(line.split()[-1])
                for line in metrics.splitlines()
                if line.startswith("vllm:spec_decode_num_draft_tokens_total")
            ]
            assert drafted and drafted[0] > 0, metrics
        finally:
            for name in ("spec-ok", "spec-bad"):
                cluster.kubectl("delete", "llmservice", name, "-n", ns, "--wait=true", check=False)
            agent.stop()
