"""Pure functions: a resolved LLMService -> the Kubernetes objects that serve it.

No cluster, no I/O: the operator applies what these return, `kvpilot render` prints it, and the
tests check it field by field. `serve_args` is the operator's side of the `kvpilot serve` contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvpilot_engine.config import QUANTIZATIONS

from kvpilot_operator import __version__
from kvpilot_operator.api import API_VERSION, LLMService, LLMServiceSpec

ENGINE_PORT = 8000
MODELS_MOUNT = "/models"
DEFAULT_ENGINE_IMAGE = f"kvpilot/engine:{__version__}"
DEFAULT_DRAIN_SECONDS = 30  # `kvpilot serve --drain-timeout` default
SERVICE_LABEL = "kvpilot.io/llmservice"
# How the autoscaler finds one service's engine series: the labels a standard `kubernetes-pods`
# scrape job (labelmap of pod labels, plus `namespace`) gives them.
PROMETHEUS_SELECTOR = 'namespace="{namespace}",kvpilot_io_llmservice="{name}"'
MANAGED_BY = "kvpilot-operator"
NON_ROOT_UID = 65532
# What `kvpilot serve` of the same release implements (the operator and engine ship together).
# What this release's engine implements (a policy may name a method an older engine lacks).
ENGINE_QUANTIZATIONS = frozenset(QUANTIZATIONS)
# Bundled models that are GGUF files (engine/kvpilot_engine/loader.py BUNDLED_MODELS).
BUNDLED_GGUF = frozenset(
    {"smollm2", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"}
)


class SpecError(ValueError):
    """A spec the schema admits but the operator cannot serve (-> Degraded, reason InvalidSpec)."""


@dataclass(frozen=True)
class RenderOptions:
    engine_image: str = DEFAULT_ENGINE_IMAGE
    pdb_api_version: str = "policy/v1"  # policy/v1beta1 on clusters older than 1.21
    cluster_domain: str = "cluster.local"


def engine_name(service: str) -> str:
    return f"{service}-engine"


def selector_labels(service: str) -> dict[str, str]:
    return {SERVICE_LABEL: service, "app.kubernetes.io/component": "engine"}


def selector_string(service: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector_labels(service).items())


def common_labels(service: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kvpilot-engine",
        "app.kubernetes.io/instance": service,
        "app.kubernetes.io/component": "engine",
        "app.kubernetes.io/part-of": "kvpilot",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        SERVICE_LABEL: service,
    }


def served_name(svc: LLMService) -> str:
    return svc.spec.model.served_name or svc.metadata.name


def endpoint_url(svc: LLMService, opts: RenderOptions = RenderOptions()) -> str:
    host = f"{svc.metadata.name}.{svc.metadata.namespace or 'default'}.svc.{opts.cluster_domain}"
    return f"http://{host}:{ENGINE_PORT}/v1"


def check_servable(spec: LLMServiceSpec) -> None:
    """Cross-field rules the CRD schema cannot express (Kubernetes 1.20 has no CEL)."""
    problems = []
    scaling = spec.scaling
    low, high = (scaling.min_replicas, scaling.max_replicas) if scaling else (None, None)
    if low is not None and high is not None and low > high:
        problems.append(
            f"spec.scaling.minReplicas ({low}) is greater than spec.scaling.maxReplicas ({high})"
        )
    if spec.parallelism.pipeline > 1:
        problems.append(
            "spec.parallelism.pipeline > 1: the engine does not do pipeline parallelism"
        )
    gpus = spec.resources.gpu.count
    if spec.parallelism.tensor > 1 and gpus and spec.parallelism.tensor != gpus:
        problems.append(
            f"spec.parallelism.tensor ({spec.parallelism.tensor}) must equal "
            f"spec.resources.gpu.count ({gpus}): one GPU per tensor-parallel rank"
        )
    if spec.quantization == "fp8" and not gpus:
        problems.append("spec.quantization fp8 needs a Hopper GPU: set spec.resources.gpu.count")
    elif spec.quantization == "gguf" and not _is_gguf(model_path(spec)):
        problems.append(
            f"spec.quantization gguf keeps a GGUF file's quantized tensors, but the model "
            f"{model_path(spec)!r} is not a .gguf file; use int8 or int4 for other checkpoints"
        )
    elif spec.quantization not in ENGINE_QUANTIZATIONS:
        # The engine would refuse the flag at start-up and the pod would crash-loop.
        problems.append(
            f"spec.quantization {spec.quantization} (perhaps from the policy) is not implemented "
            f"by this engine version (it serves: {', '.join(sorted(ENGINE_QUANTIZATIONS))}); "
            "set spec.quantization: none"
        )
    if problems:
        raise SpecError("; ".join(problems))


def desired_replicas(spec: LLMServiceSpec) -> int:
    """spec.replicas (the autoscaler's or `kubectl scale`'s), clamped to the scaling bounds."""
    scaling = spec.scaling
    assert scaling is not None and scaling.min_replicas is not None  # resolved spec
    low = 0 if scaling.scale_to_zero else scaling.min_replicas
    high = scaling.max_replicas if scaling.max_replicas is not None else max(low, 1)
    wanted = spec.replicas if spec.replicas is not None else scaling.min_replicas
    return max(low, min(high, wanted))


def model_path(spec: LLMServiceSpec) -> str:
    source = spec.model.source
    if source.pvc is None:
        assert source.path is not None
        return source.path
    return f"{MODELS_MOUNT}/{(source.path or '').lstrip('/')}".rstrip("/")


def _is_gguf(path: str) -> bool:
    return path.lower().endswith(".gguf") or path.lower() in BUNDLED_GGUF


def serve_args(svc: LLMService, spec: LLMServiceSpec) -> list[str]:
    """`kvpilot serve` arguments for a resolved spec (only what is set: the engine's defaults
    stay the engine's)."""
    args = [
        model_path(spec),
        "--host",
        "0.0.0.0",
        "--port",
        str(ENGINE_PORT),
        "--served-model-name",
        served_name(svc),
        "--dtype",
        spec.model.dtype,
    ]
    if spec.model.max_context is not None:
        args += ["--max-model-len", str(spec.model.max_context)]
    if spec.quantization not in (None, "none"):
        args += ["--quantization", spec.quantization]
    if spec.parallelism.tensor > 1:
        args += ["--tensor-parallel-size", str(spec.parallelism.tensor)]
    if spec.resources.gpu.count:
        args += ["--device", "cuda"]
    engine = spec.engine
    if engine is not None:
        flags: list[tuple[str, Any]] = [
            ("--max-num-batched-tokens", engine.max_num_batched_tokens),
            ("--max-num-seqs", engine.max_num_seqs),
            ("--block-size", engine.block_size),
            ("--kv-cache-memory", engine.kv_cache_memory),
            ("--scheduling-policy", engine.scheduling_policy),
            ("--max-waiting", engine.max_waiting),
            ("--drain-timeout", engine.drain_timeout_seconds),
        ]
        args += [part for flag, value in flags if value is not None for part in (flag, str(value))]
        if engine.enable_prefix_caching is False:
            args.append("--no-enable-prefix-caching")
        if engine.enable_chunked_prefill is False:
            args.append("--no-enable-chunked-prefill")
        args += engine.extra_args or []
    return args


def _owner_references(svc: LLMService) -> list[dict[str, Any]]:
    if not svc.metadata.uid:  # `kvpilot render` without a cluster
        return []
    return [
        {
            "apiVersion": API_VERSION,
            "kind": "LLMService",
            "name": svc.metadata.name,
            "uid": svc.metadata.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def _metadata(svc: LLMService, name: str) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": svc.metadata.namespace or "default",
        "labels": common_labels(svc.metadata.name),
    }
    owners = _owner_references(svc)
    if owners:
        meta["ownerReferences"] = owners
    return meta


def _container_resources(spec: LLMServiceSpec) -> dict[str, Any]:
    res = spec.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if res.cpu is not None:
        requests["cpu"] = str(res.cpu)
    if res.memory is not None:
        # Memory is not compressible: the limit equals the request so the KV pool sized at
        # start-up is never OOM-killed later by a neighbour.
        requests["memory"] = limits["memory"] = str(res.memory)
    if res.gpu.count:
        requests[res.gpu.resource_name] = limits[res.gpu.resource_name] = str(res.gpu.count)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def deployment(svc: LLMService, spec: LLMServiceSpec, opts: RenderOptions) -> dict[str, Any]:
    name = svc.metadata.name
    drain = (spec.engine.drain_timeout_seconds if spec.engine else None) or DEFAULT_DRAIN_SECONDS
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    if spec.model.source.pvc is not None:
        volumes.append(
            {
                "name": "models",
                "persistentVolumeClaim": {
                    "claimName": spec.model.source.pvc.claim_name,
                    "readOnly": True,
                },
            }
        )
        mounts.append({"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True})
    http_get = {"port": "http"}
    container: dict[str, Any] = {
        "name": "engine",
        "image": spec.image or opts.engine_image,
        "command": ["kvpilot", "serve"],
        "args": serve_args(svc, spec),
        "ports": [{"name": "http", "containerPort": ENGINE_PORT, "protocol": "TCP"}],
        # A read-only root filesystem: caches and temporary files go to the /tmp emptyDir.
        "env": [
            {"name": "HOME", "value": "/tmp"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ],
        "resources": _container_resources(spec),
        "volumeMounts": mounts,
        # Loading weights can take minutes; the startup probe holds liveness off until then.
        "startupProbe": {
            "httpGet": {**http_get, "path": "/health"},
            "periodSeconds": 5,
            "failureThreshold": 180,
        },
        "livenessProbe": {
            "httpGet": {**http_get, "path": "/health"},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {**http_get, "path": "/ready"},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 2,
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": NON_ROOT_UID,
            "runAsGroup": NON_ROOT_UID,
            "fsGroup": NON_ROOT_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "automountServiceAccountToken": False,
        # The engine drains in-flight requests on SIGTERM; give it that long, plus margin.
        "terminationGracePeriodSeconds": drain + 15,
        "enableServiceLinks": False,
    }
    node_selector = dict(spec.resources.node_selector or {})
    if spec.resources.gpu.count and spec.resources.gpu.type:
        node_selector["nvidia.com/gpu.product"] = spec.resources.gpu.type
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    tolerations = [
        t.model_dump(by_alias=True, exclude_none=True) for t in spec.resources.tolerations or []
    ]
    if spec.resources.gpu.count:
        tolerations.append(
            {"key": spec.resources.gpu.resource_name, "operator": "Exists", "effect": "NoSchedule"}
        )
    if tolerations:
        pod_spec["tolerations"] = tolerations
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(svc, engine_name(name)),
        "spec": {
            "replicas": desired_replicas(spec),
            "selector": {"matchLabels": selector_labels(name)},
            # Never drop below the serving replicas during a rollout: surge first.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "revisionHistoryLimit": 3,
            "progressDeadlineSeconds": 1200,
            "template": {
                "metadata": {
                    "labels": common_labels(name),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(ENGINE_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def service(svc: LLMService, spec: LLMServiceSpec, opts: RenderOptions) -> dict[str, Any]:
    name = svc.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(svc, name),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(name),
            "ports": [
                {"name": "http", "port": ENGINE_PORT, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }


def pod_disruption_budget(
    svc: LLMService, spec: LLMServiceSpec, opts: RenderOptions
) -> dict[str, Any]:
    name = svc.metadata.name
    return {
        "apiVersion": opts.pdb_api_version,
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(svc, engine_name(name)),
        # One engine at a time: a drain never takes more than one replica's KV cache offline.
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(name)}},
    }


def render(
    svc: LLMService, spec: LLMServiceSpec, opts: RenderOptions = RenderOptions()
) -> list[dict[str, Any]]:
    """Every object an LLMService becomes, given its resolved spec. Raises SpecError."""
    check_servable(spec)
    return [
        deployment(svc, spec, opts),
        service(svc, spec, opts),
        pod_disruption_budget(svc, spec, opts),
    ]
