"""spec.model.source.uri end to end on the local control plane: the real operator and API
server, the node agent (this machine's kubelet stand-in) running the init container, the engine
and the router as processes, and S3 as moto's server on loopback. An LLMService whose weights are
SmolLM2's GGUF in a bucket comes up Ready and answers a chat; a missing Secret and an empty
prefix each turn it Degraded with the reason."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kvpilot_operator.local.cluster import LocalCluster
from kvpilot_operator.local.nodeagent import NodeAgent
from kvpilot_operator.local.procs import free_ports

from tests.support.kube import apply, condition, get, running_operator, service_doc, wait_for

pytestmark = pytest.mark.slow
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def s3_endpoint(smollm2_path: str) -> Iterator[str]:
    """moto's S3 server with the bundled SmolLM2 GGUF at s3://models/smollm2/."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_ports(1)[0]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="minio",
        aws_secret_access_key="minio-secret",
    )
    s3.create_bucket(Bucket="models")
    s3.upload_file(smollm2_path, "models", f"smollm2/{GGUF}")
    try:
        yield endpoint
    finally:
        server.stop()


def model(endpoint: str, uri: str, secret: str) -> dict[str, Any]:
    return {
        "source": {"uri": uri, "secretName": secret, "endpoint": endpoint, "region": "us-east-1"},
        "servedName": "smollm2",
        "dtype": "float32",
        "maxContext": 512,
    }


def test_s3_source_serves_and_bad_sources_say_why(
    cluster: LocalCluster, ns: str, tmp_path: Path, s3_endpoint: str, smollm2_path: str
) -> None:
    cluster.kubectl(
        "create", "secret", "generic", "s3-creds", "-n", ns,
        "--from-literal=AWS_ACCESS_KEY_ID=minio",
        "--from-literal=AWS_SECRET_ACCESS_KEY=minio-secret",
    )  # fmt: skip
    engine = {"kvCacheMemory": "64MiB", "maxNumSeqs": 4, "drainTimeoutSeconds": 1}
    scaling = {"minReplicas": 1, "maxReplicas": 1}
    docs = {
        "chat": model(s3_endpoint, "s3://models/smollm2", "s3-creds"),
        "no-secret": model(s3_endpoint, "s3://models/smollm2", "absent"),
        "empty": model(s3_endpoint, "s3://models/nothing-here", "s3-creds"),
    }
    with running_operator(cluster, tmp_path / "operator.log"):
        agent = NodeAgent(
            cluster.kubeconfig, ns, tmp_path / "pods", env={"KUBECONFIG": str(cluster.kubeconfig)}
        ).start()
        try:
            for name, spec_model in docs.items():
                doc = service_doc(
                    name, model=spec_model, quantization="none", engine=engine, scaling=scaling
                )
                apply(cluster, doc, ns)

            def degraded(name: str) -> dict[str, Any] | None:
                cond = condition(get(cluster, "llmservice", name, ns), "Degraded")
                return cond if cond.get("reason") == "EngineFailing" else None

            missing = wait_for("no-secret Degraded", lambda: degraded("no-secret"), timeout=60)
            assert 'secret "absent" not found' in missing["message"], missing
            assert "model download" in missing["message"]
            empty = wait_for("empty Degraded", lambda: degraded("empty"), timeout=90)
            assert "NotFound" in empty["message"] and "nothing-here" in empty["message"], empty

            wait_for(
                "chat Ready",
                lambda: (
                    (get(cluster, "llmservice", "chat", ns) or {})
                    .get("status", {})
                    .get("readyReplicas")
                ),
                timeout=240,
            )
            router = cluster.kubectl(
                "get", "pods", "-n", ns, "-l",
                "app.kubernetes.io/component=router,kvpilot.io/llmservice=chat",
                "-o", "jsonpath={.items[0].status.podIP}",
            ).stdout.strip()  # fmt: skip
            reply = httpx.post(
                f"http://{router}:8000/v1/chat/completions",
                json={
                    "model": "smollm2",
                    "messages": [{"role": "user", "content": "Say hi."}],
                    "max_tokens": 8,
                    "temperature": 0,
                },
                timeout=60,
            )
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["message"]["content"]
            # The engine served the bucket's bytes, downloaded into the pod's model cache.
            (got,) = (tmp_path / "pods" / "volumes").glob(
                f"{ns}_chat-engine-*/model-cache/*/{GGUF}"
            )
            want = hashlib.sha256(Path(smollm2_path).read_bytes()).hexdigest()
            assert hashlib.sha256(got.read_bytes()).hexdigest() == want
            # The status names the revision the download pinned (its manifest's).
            pinned = json.loads((got.parent / ".kvpilot-source.json").read_text())["revision"]

            def source() -> dict[str, Any] | None:
                st = (get(cluster, "llmservice", "chat", ns) or {}).get("status") or {}
                return st.get("source") if (st.get("source") or {}).get("revision") else None

            shown = wait_for("status.source.revision", source, timeout=60)
            assert shown == {"uri": "s3://models/smollm2", "revision": pinned, "downloading": 0}
        finally:
            for name in docs:
                cluster.kubectl("delete", "llmservice", name, "-n", ns, "--wait=true", check=False)
            agent.stop()
