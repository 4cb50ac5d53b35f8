"""The pure half of the operator, without a cluster: CRDs generated from the models, policy
resolution, and the manifests an LLMService becomes — whose engine args are parsed by the real
`kvpilot serve` argument parser, the other side of the contract."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from kvpilot_engine.cli import build_parser, engine_args_from
from kvpilot_engine.contracts import QUANTIZATIONS
from kvpilot_operator.api.crds import (
    CRD_DIRS,
    REFERENCE,
    llmservice_crd,
    reference_markdown,
    render_crds,
)
from kvpilot_operator.api.names import selector_string
from kvpilot_operator.api.policies import BUILTIN_DEFAULTS, load_presets, resolve_spec
from kvpilot_operator.api.types import LLMService, ServingPolicy
from kvpilot_operator.controller.manifests import RenderOptions, SpecError, desired_replicas, render
from pydantic import ValidationError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples"


def make_service(**spec: Any) -> LLMService:
    body = {"model": {"source": {"path": "smollm2"}}, **spec}
    return LLMService.model_validate(
        {"metadata": {"name": "chat", "namespace": "team-a", "uid": "u-1"}, "spec": body}
    )


def rendered(svc: LLMService, policy: str | None = None, **opts: Any) -> dict[str, dict]:
    presets = load_presets()
    spec = resolve_spec(svc.spec, presets[policy].spec if policy else None)
    out: dict[str, dict] = {}
    for obj in render(svc, spec, RenderOptions(**opts)):
        out.setdefault(obj["kind"], obj)  # the first Deployment is the stable engine one
    return out


# --- CRDs ------------------------------------------------------------------------------------


def test_crd_files_are_up_to_date() -> None:
    for directory in CRD_DIRS:
        for name, text in render_crds().items():
            path = directory / name
            assert path.is_file() and path.read_text() == text, (
                f"{path} is out of date: run `kvpilot crds`"
            )
    assert REFERENCE.read_text() == reference_markdown(), "docs/crd-reference.md: `kvpilot crds`"


def _walk(node: dict[str, Any], where: str = "") -> list[str]:
    """Violations of Kubernetes' structural-schema rules."""
    bad = []
    if "$ref" in node or "allOf" in node or "oneOf" in node:
        bad.append(f"{where}: $ref/allOf/oneOf")
    if not node.get("x-kubernetes-int-or-string") and "type" not in node:
        bad.append(f"{where}: no type")
    if node.get("type") == "null" or node.get("nullable"):
        bad.append(f"{where}: null")
    if isinstance(node.get("additionalProperties"), bool):
        bad.append(f"{where}: additionalProperties bool")
    for branch in node.get("anyOf", []):
        if set(branch) - {"required"}:
            bad.append(f"{where}: anyOf branch with {set(branch)}")
    for name, sub in (node.get("properties") or {}).items():
        bad += _walk(sub, f"{where}.{name}")
    if isinstance(node.get("items"), dict):
        bad += _walk(node["items"], f"{where}[]")
    if isinstance(node.get("additionalProperties"), dict):
        bad += _walk(node["additionalProperties"], f"{where}{{}}")
    return bad


def test_crd_schema_is_structural_with_enums_ranges_defaults() -> None:
    crd = llmservice_crd()
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    assert _walk(schema) == []
    spec = schema["properties"]["spec"]
    assert spec["required"] == ["model"]
    assert spec["properties"]["quantization"]["enum"] == ["none", "int8", "int4", "fp8", "gguf"]
    assert tuple(spec["properties"]["quantization"]["enum"]) == QUANTIZATIONS  # the engine's
    assert spec["properties"]["parallelism"]["properties"]["tensor"] == {
        **spec["properties"]["parallelism"]["properties"]["tensor"],
        "minimum": 1,
        "default": 1,
    }
    assert spec["properties"]["model"]["properties"]["dtype"]["default"] == "auto"
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Model", "Replicas", "Ready", "TTFT-P95", "SLO-Met", "Age"]


# --- policies --------------------------------------------------------------------------------


def test_presets_follow_the_seed_scenarios() -> None:
    presets = {name: p.spec for name, p in load_presets().items()}
    assert set(presets) == {"interactive-chat", "copilot", "offline-batch"}
    chat, copilot, batch = presets["interactive-chat"], presets["copilot"], presets["offline-batch"]
    # Co-pilot: stricter TTFT than chat, small batches; batch: throughput, scale to zero.
    assert copilot.slo.ttft.target_ms < chat.slo.ttft.target_ms < batch.slo.ttft.target_ms
    assert copilot.engine.max_num_seqs < chat.engine.max_num_seqs < batch.engine.max_num_seqs
    assert batch.engine.enable_chunked_prefill is False and batch.scaling.scale_to_zero
    assert chat.quantization == batch.quantization == "int4"
    assert not chat.scaling.scale_to_zero and not copilot.scaling.scale_to_zero


def test_service_fields_win_over_policy_over_builtin_defaults() -> None:
    policy = load_presets()["interactive-chat"].spec
    svc = make_service(
        quantization="none",
        engine={"maxNumSeqs": 7, "enablePrefixCaching": False},
        slo={"ttft": {"targetMs": 250}},
    )
    spec = resolve_spec(svc.spec, policy)
    assert spec.quantization == "none"  # the service's own field
    assert spec.engine.max_num_seqs == 7
    assert spec.engine.enable_prefix_caching is False  # an explicit false is not "unset"
    assert spec.engine.max_num_batched_tokens == policy.engine.max_num_batched_tokens
    assert spec.slo.ttft.target_ms == 250 and spec.slo.tpot == policy.slo.tpot
    assert spec.scaling.max_replicas == policy.scaling.max_replicas
    # No policy: built-in defaults only.
    bare = resolve_spec(make_service().spec, None)
    assert bare.scaling.min_replicas == BUILTIN_DEFAULTS["scaling"]["minReplicas"]
    assert bare.quantization == "none" and bare.engine is None


# --- manifests -------------------------------------------------------------------------------


def serve_namespace(args: list[str]):
    return build_parser().parse_args(["serve", *args])


def test_engine_args_are_accepted_by_kvpilot_serve() -> None:
    svc = make_service(
        model={
            "source": {"path": "smollm2"},
            "servedName": "tiny",
            "maxContext": 1024,
            "dtype": "bfloat16",
        },
        engine={
            "maxNumBatchedTokens": 300,
            "maxNumSeqs": 9,
            "blockSize": 32,
            "enablePrefixCaching": False,
            "enableChunkedPrefill": False,
            "schedulingPolicy": "priority",
            "kvCacheMemory": "1GiB",
            "maxWaiting": 5,
            "drainTimeoutSeconds": 12,
        },
    )
    objs = rendered(svc)
    args = objs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    ns = serve_namespace(args)
    engine = engine_args_from(ns)
    assert (ns.model, ns.served_model_name, ns.port, ns.host) == (
        "smollm2",
        "tiny",
        8000,
        "0.0.0.0",
    )
    assert (ns.max_waiting, ns.drain_timeout) == (5, 12.0)
    assert engine.dtype == "bfloat16" and engine.max_model_len == 1024
    assert (engine.max_num_batched_tokens, engine.max_num_seqs, engine.block_size) == (300, 9, 32)
    assert engine.enable_prefix_caching is False and engine.enable_chunked_prefill is False
    assert engine.scheduling_policy == "priority" and engine.kv_cache_memory == "1GiB"
    # Scheduling by priority: the engines take it from the routers' header (by API key tier).
    assert ns.trust_priority_header is True
    # The pod waits for the engine's drain before it is killed.
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > 12


def test_unset_engine_knobs_leave_the_engine_defaults() -> None:
    default = rendered(make_service())["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert "--trust-priority-header" not in default["args"]  # FCFS: no priority to trust
    args = rendered(make_service())["Deployment"]["spec"]["template"]["spec"]["containers"][0][
        "args"
    ]
    defaults = engine_args_from(serve_namespace(["smollm2"]))
    assert engine_args_from(serve_namespace(args)) == defaults


@pytest.mark.slow
@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_render(example: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kvpilot_engine.cli", "render", "-f", str(example)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    kinds = [d["kind"] for d in yaml.safe_load_all(out)]
    assert kinds[0] == "Deployment"  # the stable engines; canary/shadow only with a rollout
    assert kinds[-9:] == [
        "ConfigMap",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "NetworkPolicy",
    ]


def test_deployment_security_probes_labels_and_owner() -> None:
    objs = rendered(
        make_service(resources={"cpu": "500m", "memory": "2Gi"}, quantization="none"), "copilot"
    )
    dep, svc, pdb = objs["Deployment"], objs["Service"], objs["PodDisruptionBudget"]
    for obj in (dep, svc, pdb):
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "chat"
        assert labels["app.kubernetes.io/managed-by"] == "kvpilot-operator"
        assert obj["metadata"]["namespace"] == "team-a"
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner == {
            "apiVersion": "kvpilot.io/v1alpha1",
            "kind": "LLMService",
            "name": "chat",
            "uid": "u-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    pod = dep["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert container["resources"] == {
        "requests": {"cpu": "500m", "memory": "2Gi"},
        "limits": {"memory": "2Gi"},
    }
    # copilot keeps two warm replicas.
    assert dep["spec"]["replicas"] == 2
    sel = dep["spec"]["selector"]["matchLabels"]
    assert sel == {
        "kvpilot.io/llmservice": "chat",
        "app.kubernetes.io/component": "engine",
        "kvpilot.io/track": "stable",
    }
    # The PDB and the scale subresource's selector cover every engine serving users (stable and
    # canary); the Service sends clients to the routers.
    engines = pdb["spec"]["selector"]["matchLabels"]
    assert engines.items() <= sel.items()
    assert selector_string("chat") == ",".join(f"{k}={v}" for k, v in engines.items())
    assert svc["spec"]["selector"] == {
        "kvpilot.io/llmservice": "chat",
        "app.kubernetes.io/component": "router",
    }
    assert sel.items() <= pod["metadata"]["labels"].items()
    assert len(pod["metadata"]["labels"]["kvpilot.io/revision"]) == 10
    assert (
        rendered(make_service(), pdb_api_version="policy/v1beta1")["PodDisruptionBudget"][
            "apiVersion"
        ]
        == "policy/v1beta1"
    )


def test_gpu_pvc_and_tensor_parallel() -> None:
    svc = make_service(
        model={"source": {"pvc": {"claimName": "weights"}, "path": "llama"}},
        parallelism={"tensor": 2},
        resources={
            "gpu": {"count": 2, "type": "NVIDIA-H200"},
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "dedicated", "operator": "Exists"}],
        },
    )
    pod = rendered(svc)["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pod["nodeSelector"] == {"pool": "gpu", "nvidia.com/gpu.product": "NVIDIA-H200"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert {
        "name": "models",
        "persistentVolumeClaim": {"claimName": "weights", "readOnly": True},
    } in pod["volumes"]
    ns = serve_namespace(container["args"])
    assert ns.model == "/models/llama" and ns.tensor_parallel_size == 2 and ns.device == "cuda"


def test_replicas_follow_spec_within_bounds() -> None:
    def replicas(**spec: Any) -> int:
        return desired_replicas(resolve_spec(make_service(**spec).spec, None))

    assert replicas() == 1
    assert replicas(replicas=3, scaling={"maxReplicas": 5}) == 3
    assert replicas(replicas=9, scaling={"maxReplicas": 5}) == 5
    assert replicas(replicas=0) == 1  # min 1 and no scale to zero
    assert replicas(replicas=0, scaling={"scaleToZero": True}) == 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"parallelism": {"tensor": 4}, "resources": {"gpu": {"count": 4}}}, "3 key-value heads"),
        ({"parallelism": {"pipeline": 2}}, "pipeline parallelism"),
        ({"parallelism": {"tensor": 4}, "resources": {"gpu": {"count": 2}}}, "must equal"),
        ({"quantization": "fp8"}, "fp8 needs a Hopper GPU"),
        ({"quantization": "gguf", "model": {"source": {"path": "/m/llama"}}}, "not a .gguf"),
    ],
)
def test_specs_the_schema_admits_but_cannot_be_served(spec: dict, message: str) -> None:
    svc = make_service(**spec)
    with pytest.raises(SpecError, match=message):
        render(svc, resolve_spec(svc.spec, None))


def test_pydantic_rejects_what_the_crd_rejects() -> None:
    good = {"metadata": {"name": "x"}, "spec": {"model": {"source": {"path": "m"}}}}
    LLMService.model_validate(good)
    for path, value in [
        (("spec", "quantization"), "int3"),
        (("spec", "model", "source"), {}),
        (("spec", "engine"), {"blockSize": 12}),
        (("spec", "scaling"), {"maxReplicas": 0}),
        (("spec", "bogus"), 1),
    ]:
        bad = copy.deepcopy(good)
        node = bad
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(ValidationError):
            LLMService.model_validate(bad)
    with pytest.raises(ValidationError):
        ServingPolicy.model_validate({"metadata": {"name": "p"}, "spec": {"quantization": "x"}})


@pytest.mark.slow
def test_control_plane_commands_never_import_torch() -> None:
    """The operator image carries no torch: its code paths, and the CLI that starts them, must
    not import it."""
    code = (
        "import sys\n"
        "from kvpilot_engine.cli import build_parser\n"
        "build_parser().parse_args(['render', '-f', 'x'])\n"
        "import kvpilot_operator.handlers, kvpilot_operator.controller.reconcile\n"
        "import kvpilot_operator.api.crds\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_quantization_reaches_the_engine_args() -> None:
    for method in ("int8", "int4", "gguf"):
        dep = rendered(make_service(quantization=method))["Deployment"]
        args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--quantization") + 1] == method
    # A policy's int4 applies when the service says nothing.
    dep = rendered(make_service(), "interactive-chat")["Deployment"]
    assert "int4" in dep["spec"]["template"]["spec"]["containers"][0]["args"]


def _env(deployment: dict[str, Any]) -> dict[str, Any]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("valueFrom", e.get("value")) for e in container["env"]}


def test_the_api_key_secret_reaches_routers_and_every_engine() -> None:
    """Clients send the key to the routers; the routers send it on to the engines (stable,
    canary, shadow), which refuse callers without it, so nothing goes around the routers."""
    svc = make_service(
        router={"apiKeySecret": "chat-key"},
        rollout={"shadow": {"replicas": 1, "quantization": "int8"}},
    )
    spec = resolve_spec(svc.spec, None)
    deployments = {
        o["metadata"]["name"]: o
        for o in render(svc, spec, RenderOptions())
        if o["kind"] == "Deployment"
    }
    ref = {"secretKeyRef": {"name": "chat-key", "key": "api-key"}}
    for name in ("chat-engine", "chat-engine-shadow"):
        assert _env(deployments[name])["KVPILOT_API_KEY"] == ref, name
    router = _env(deployments["chat-router"])
    assert router["KVPILOT_API_KEY"] == router["KVPILOT_UPSTREAM_API_KEY"] == ref
    # Without a Secret nobody needs a key, engines included.
    plain = rendered(make_service())["Deployment"]
    assert "KVPILOT_API_KEY" not in _env(plain)


def _engine_pod(svc: LLMService, policy: str | None = None) -> dict[str, Any]:
    return rendered(svc, policy)["Deployment"]["spec"]["template"]["spec"]


def test_engines_without_resources_get_default_requests_not_best_effort() -> None:
    (container,) = _engine_pod(make_service())["containers"]
    # Requests (Burstable, not BestEffort), and no memory limit a larger model could hit.
    assert container["resources"] == {"requests": {"cpu": "1", "memory": "2Gi"}}
    # Each default fills only what is missing; what is set keeps its limit.
    (container,) = _engine_pod(make_service(resources={"memory": "6Gi"}))["containers"]
    assert container["resources"] == {
        "requests": {"cpu": "1", "memory": "6Gi"},
        "limits": {"memory": "6Gi"},
    }
    (container,) = _engine_pod(make_service(resources={"cpu": "3"}))["containers"]
    assert container["resources"] == {"requests": {"cpu": "3", "memory": "2Gi"}}
    # GPU engines too: QoS looks only at cpu and memory.
    gpu = make_service(resources={"gpu": {"count": 1}})
    (container,) = _engine_pod(gpu)["containers"]
    assert container["resources"]["requests"] == {
        "cpu": "1",
        "memory": "2Gi",
        "nvidia.com/gpu": "1",
    }


def test_tensor_parallel_pods_get_a_memory_backed_dev_shm() -> None:
    svc = make_service(parallelism={"tensor": 2}, resources={"gpu": {"count": 2}})
    pod = _engine_pod(svc)
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}} in pod["volumes"]
    mounts = pod["containers"][0]["volumeMounts"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in mounts
    # One rank: nothing to exchange, the container's own /dev/shm will do.
    single = _engine_pod(make_service())
    assert all(v["name"] != "dshm" for v in single["volumes"])
    assert all(m["mountPath"] != "/dev/shm" for m in single["containers"][0]["volumeMounts"])


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels, and matchExpressions with In) applied to labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    return all(
        e["operator"] == "In" and labels.get(e["key"]) in e["values"]
        for e in selector.get("matchExpressions", [])
    )


def test_network_policies_let_only_routers_and_prometheus_reach_engines() -> None:
    svc = make_service(rollout={"shadow": {"replicas": 1}})
    objs = render(svc, resolve_spec(svc.spec, None), RenderOptions())
    policies = {o["metadata"]["name"]: o for o in objs if o["kind"] == "NetworkPolicy"}
    assert set(policies) == {"chat-engine", "chat-router"}
    for policy in policies.values():
        assert policy["apiVersion"] == "networking.k8s.io/v1"
        assert policy["metadata"]["namespace"] == "team-a"
        assert policy["metadata"]["ownerReferences"][0]["uid"] == "u-1"
        assert policy["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kvpilot-operator"
        assert policy["spec"]["policyTypes"] == ["Ingress"]
    pods = {
        o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"]
        for o in objs
        if o["kind"] == "Deployment"
    }
    engine_policy = policies["chat-engine"]["spec"]
    # Every engine pod (stable, shadow) is covered, no router pod.
    for name, labels in pods.items():
        assert _selects(engine_policy["podSelector"], labels) == (name != "chat-router"), name
    assert _selects(policies["chat-router"]["spec"]["podSelector"], pods["chat-router"])
    from_routers, from_scraper = engine_policy["ingress"]
    assert from_routers["ports"] == from_scraper["ports"] == [{"protocol": "TCP", "port": 8000}]
    (routers,) = from_routers["from"]
    assert set(routers) == {"podSelector"}  # this namespace only
    assert _selects(routers["podSelector"], pods["chat-router"])
    other = {**pods["chat-router"], "kvpilot.io/llmservice": "other"}
    assert not _selects(routers["podSelector"], other)  # another service's routers
    # Prometheus (as the Prometheus Operator labels it) in any namespace, by default.
    assert from_scraper["from"] == [
        {
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
            "namespaceSelector": {},  # `matchLabels: {}` would churn on every apply
        }
    ]
    # Routers take clients from anywhere, on their port only.
    assert policies["chat-router"]["spec"]["ingress"] == [
        {"ports": [{"protocol": "TCP", "port": 8000}]}
    ]
    # The scraper is configurable: a monitoring namespace, any pod in it.
    opts = RenderOptions(scraper_pod_labels={}, scraper_namespace_labels={"team": "monitoring"})
    objs = render(svc, resolve_spec(svc.spec, None), opts)
    engine_policy = next(
        o for o in objs if o["metadata"]["name"] == "chat-engine" and o["kind"] == "NetworkPolicy"
    )
    assert engine_policy["spec"]["ingress"][1]["from"] == [
        {
            "podSelector": {},
            "namespaceSelector": {"matchLabels": {"team": "monitoring"}},
        }
    ]
