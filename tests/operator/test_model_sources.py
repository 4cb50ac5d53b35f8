"""spec.model.source.uri through the pure manifest functions (no cluster): the download init
container, its credentials by reference, the model cache, the engine reading from it, pvc://
mounted in place, the shadow's own source."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kvpilot_operator.api.policies import resolve_spec
from kvpilot_operator.api.types import LLMService
from kvpilot_operator.controller.manifests import (
    MODEL_CACHE_MOUNT,
    RenderOptions,
    render,
    revision_of,
)
from pydantic import ValidationError


def service(source: dict[str, Any], **spec: Any) -> LLMService:
    return LLMService.model_validate(
        {
            "metadata": {"name": "chat", "namespace": "team-a", "uid": "u-1"},
            "spec": {"model": {"source": source}, **spec},
        }
    )


def deployments(svc: LLMService) -> list[dict[str, Any]]:
    spec = resolve_spec(svc.spec, None)
    return [o for o in render(svc, spec, RenderOptions()) if o["kind"] == "Deployment"]


def pod(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def test_hf_source_downloads_in_an_init_container() -> None:
    svc = service({"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct@main", "secretName": "hf"})
    p = pod(deployments(svc)[0])
    (init,) = p["initContainers"]
    engine = p["containers"][0]
    dest = init["args"][1]
    assert init["command"] == ["kvpilot", "download"]
    assert init["args"][0] == "hf://HuggingFaceTB/SmolLM2-135M-Instruct@main"
    assert dest.startswith(MODEL_CACHE_MOUNT + "/")
    assert init["image"] == engine["image"]  # the engine image carries `kvpilot download`
    # The engine serves the downloaded folder, from the same volume, read-only.
    assert engine["args"][0] == dest
    cache = {v["name"]: v for v in p["volumes"]}["model-cache"]
    assert cache == {"name": "model-cache", "emptyDir": {}}
    mounts = {m["name"]: m for m in engine["volumeMounts"]}
    assert mounts["model-cache"] == {
        "name": "model-cache",
        "mountPath": MODEL_CACHE_MOUNT,
        "readOnly": True,
    }
    assert {m["name"]: m.get("readOnly", False) for m in init["volumeMounts"]}[
        "model-cache"
    ] is False
    # The token by reference only: the operator never reads the Secret, and no value is inlined.
    token = {e["name"]: e for e in init["env"]}["HF_TOKEN"]
    assert token["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "HF_TOKEN"}}
    assert all("value" not in e for e in init["env"] if e["name"] == "HF_TOKEN")
    assert "HF_TOKEN" not in {e["name"] for e in engine["env"]}
    assert init["securityContext"]["readOnlyRootFilesystem"] is True
    assert init["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_s3_source_endpoint_region_shared_cache() -> None:
    svc = service(
        {
            "uri": "s3://models/smol/v1",
            "secretName": "s3-creds",
            "endpoint": "http://minio.storage:9000",
            "region": "eu-west-1",
            "cache": {"claimName": "model-cache-rwx"},
        }
    )
    p = pod(deployments(svc)[0])
    (init,) = p["initContainers"]
    env = {e["name"]: e for e in init["env"]}
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage:9000"
    assert env["AWS_REGION"]["value"] == "eu-west-1"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-creds",
        "key": "AWS_ACCESS_KEY_ID",
    }
    assert env["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert "HF_TOKEN" not in env
    cache = {v["name"]: v for v in p["volumes"]}["model-cache"]
    assert cache["persistentVolumeClaim"] == {"claimName": "model-cache-rwx"}
    # One folder per URI in a shared cache; the same URI, the same folder.
    other = service({"uri": "s3://models/smol/v2"})
    assert pod(deployments(other)[0])["initContainers"][0]["args"][1] != init["args"][1]
    again = service({"uri": "s3://models/smol/v1"})
    assert pod(deployments(again)[0])["initContainers"][0]["args"][1] == init["args"][1]


def test_pvc_uri_is_mounted_not_copied() -> None:
    by_uri = pod(deployments(service({"uri": "pvc://weights/llama/8b"}))[0])
    by_fields = pod(deployments(service({"pvc": {"claimName": "weights"}, "path": "llama/8b"}))[0])
    assert "initContainers" not in by_uri
    assert by_uri["volumes"] == by_fields["volumes"]
    assert by_uri["containers"][0]["args"][0] == by_fields["containers"][0]["args"][0]


def test_path_sources_keep_their_revisions_and_uri_changes_roll() -> None:
    plain = service({"path": "smollm2"})
    assert "initContainers" not in pod(deployments(plain)[0])
    a = service({"uri": "hf://org/model@v1"})
    b = service({"uri": "hf://org/model@v2"})
    c = service({"uri": "hf://org/model@v1", "secretName": "other"})
    revisions = {revision_of(s, resolve_spec(s.spec, None)) for s in (plain, a, b, c)}
    assert len(revisions) == 4


def test_shadow_has_its_own_source() -> None:
    svc = service(
        {"path": "smollm2"},
        rollout={"shadow": {"model": {"source": {"uri": "s3://models/candidate"}}}},
    )
    stable, shadow = deployments(svc)[:2]  # then the router's
    assert "initContainers" not in pod(stable)
    (init,) = pod(shadow)["initContainers"]
    assert init["args"][0] == "s3://models/candidate"
    assert pod(shadow)["containers"][0]["args"][0] == init["args"][1]


@pytest.mark.parametrize(
    "source",
    [
        {"uri": "gs://bucket/model"},
        {"uri": "hf://"},
        {"uri": "hf://org/repo", "path": "m"},
        {"uri": "s3://models/x", "pvc": {"claimName": "w"}},
        {"path": "m", "secretName": "creds"},
        {"path": "m", "cache": {"claimName": "c"}},
        {"uri": "pvc://weights/../etc"},
        {"uri": "s3://models/x", "endpoint": "minio:9000"},
    ],
)
def test_bad_sources_are_refused(source: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        service(source)


def test_a_failed_download_is_the_engines_failure() -> None:
    from kvpilot_operator.controller.status import engine_failure

    last = json.dumps({"event": "download failed", "error": "NotFound: s3://m/x: no objects"})
    failed = {
        "metadata": {"name": "chat-engine-abc"},
        "status": {
            "initContainerStatuses": [
                {
                    "name": "model-download",
                    "state": {"terminated": {"exitCode": 1, "message": f"progress\n{last}\n"}},
                }
            ],
            "containerStatuses": [
                {"name": "engine", "state": {"waiting": {"reason": "PodInitializing"}}}
            ],
        },
    }
    assert engine_failure([failed]) == (
        "model download in engine pod chat-engine-abc exited with code 1: "
        "NotFound: s3://m/x: no objects"
    )
    no_secret = {
        "metadata": {"name": "p"},
        "status": {
            "initContainerStatuses": [
                {
                    "name": "model-download",
                    "state": {
                        "waiting": {
                            "reason": "CreateContainerConfigError",
                            "message": 'secret "hf" not found',
                        }
                    },
                }
            ]
        },
    }
    assert 'secret "hf" not found' in (engine_failure([no_secret]) or "")
    adapter = json.loads(json.dumps(failed))
    adapter["status"]["initContainerStatuses"][0]["name"] = "adapter-sql-canary"
    assert engine_failure([adapter]) == (
        "download of adapter sql-canary (spec.adapters) in engine pod chat-engine-abc exited "
        "with code 1: NotFound: s3://m/x: no objects"
    )


def test_source_status_reads_the_download_results() -> None:
    from kvpilot_operator.controller.status import source_status

    def pod(state: dict[str, Any]) -> dict[str, Any]:
        return {"status": {"initContainerStatuses": [{"name": "model-download", "state": state}]}}

    def done(revision: str) -> dict[str, Any]:
        return pod({"terminated": {"exitCode": 0, "message": json.dumps({"revision": revision})}})

    uri = "hf://org/m"
    assert source_status(uri, [done("abc"), done("abc"), pod({"running": {}})]) == {
        "uri": uri,
        "revision": "abc",
        "downloading": 1,
    }
    assert source_status(uri, [done("abc"), done("def")])["revisions"] == ["abc", "def"]
    assert source_status(uri, []) == {"uri": uri, "downloading": 0}


def test_oci_source_downloads_with_registry_credentials() -> None:
    digest = "sha256:" + "a" * 64
    svc = service({"uri": f"oci://registry.corp:5000/models/smol@{digest}", "secretName": "reg"})
    (init,) = pod(deployments(svc)[0])["initContainers"]
    assert init["args"][0] == f"oci://registry.corp:5000/models/smol@{digest}"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in init["env"] if "valueFrom" in e}
    assert env == {
        "OCI_USERNAME": {"name": "reg", "key": "OCI_USERNAME"},
        "OCI_PASSWORD": {"name": "reg", "key": "OCI_PASSWORD"},
    }
    with pytest.raises(ValidationError):
        service({"uri": "oci://registry.corp/Models/UPPER"})
