"""Pure functions: a resolved LLMService -> the Kubernetes objects that serve it.

No cluster, no I/O: the operator applies what these return, `kvpilot render` prints it, and the
tests check it field by field. `serve_args` is the operator's side of the `kvpilot serve` contract.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from kvpilot_engine.contracts import BUNDLED_KV_HEADS, QUANTIZATIONS, bundled_name, is_bundled

from kvpilot_operator import __version__
from kvpilot_operator.api.names import (
    COMPONENT_LABEL,
    ENGINE_PORT,
    REVISION_LABEL,
    ROUTER_PORT,
    ROUTES_KEY,
    SERVICE_LABEL,
    SPEC_ANNOTATION,
    TRACK_LABEL,
    common_labels,
    engine_name,
    router_name,
    selector_labels,
)
from kvpilot_operator.api.types import (
    API_VERSION,
    BatchSpec,
    LLMService,
    LLMServiceSpec,
    ModelSource,
    SLOSpec,
)

MODELS_MOUNT = "/models"
# A draft model (spec.speculative.draftModel) on a claim other than the served model's.
DRAFT_MODELS_MOUNT = "/draft-models"
# Where `spec.model.source.uri` downloads go: the init container writes, the engine reads.
MODEL_CACHE_MOUNT = "/model-cache"
DOWNLOAD_CONTAINER = "model-download"
DRAFT_DOWNLOAD_CONTAINER = "draft-model-download"
# The download's credentials, by scheme: (env and Secret key, optional).
SOURCE_SECRET_KEYS: dict[str, list[tuple[str, bool]]] = {
    "hf": [("HF_TOKEN", False)],
    "s3": [
        ("AWS_ACCESS_KEY_ID", False),
        ("AWS_SECRET_ACCESS_KEY", False),
        ("AWS_SESSION_TOKEN", True),
    ],
    "oci": [("OCI_USERNAME", False), ("OCI_PASSWORD", False)],
}
DOWNLOAD_RESOURCES = {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}}
DEFAULT_ENGINE_IMAGE = f"kvpilot/engine:{__version__}"
# The router ships in the operator's image (no torch in it).
DEFAULT_ROUTER_IMAGE = f"kvpilot/operator:{__version__}"
DEFAULT_DRAIN_SECONDS = 30  # `kvpilot serve --drain-timeout` default
NON_ROOT_UID = 65532
# What this release's engine implements (a policy may name a method an older engine lacks; the
# operator and engine ship together).
ENGINE_QUANTIZATIONS = frozenset(QUANTIZATIONS)


class SpecError(ValueError):
    """A spec the schema admits but the operator cannot serve (-> Degraded, reason InvalidSpec)."""


@dataclass(frozen=True)
class RenderOptions:
    engine_image: str = DEFAULT_ENGINE_IMAGE
    router_image: str = DEFAULT_ROUTER_IMAGE
    pdb_api_version: str = "policy/v1"  # policy/v1beta1 on clusters older than 1.21
    cluster_domain: str = "cluster.local"
    # Who may scrape the engines' /metrics through their NetworkPolicy (it is the API's port):
    # pods with these labels (empty: any pod) in namespaces with these labels (empty: any
    # namespace; None: the service's own). The default is Prometheus as the Prometheus Operator
    # and the prometheus-community chart label it, wherever it runs.
    scraper_pod_labels: dict[str, str] = dataclasses.field(
        default_factory=lambda: {"app.kubernetes.io/name": "prometheus"}
    )
    scraper_namespace_labels: dict[str, str] | None = dataclasses.field(default_factory=dict)


def revision_of(svc: LLMService, spec: LLMServiceSpec, salt: str = "") -> str:
    """10 hex digits that change exactly when an engine pod would serve differently."""
    serving = {
        # Adapters are not the model's revision: a change of theirs rolls the engines in place
        # (and has canaries of its own), and the router finds adapters on engines by folder.
        "args": serve_args(svc, spec.model_copy(update={"adapters": None})),
        "image": spec.image,
        "resources": spec.resources.model_dump(mode="json", by_alias=True, exclude_none=True),
        "pvc": spec.model.source.pvc.claim_name if spec.model.source.pvc else None,
        "salt": salt,
    }
    if spec.model.source.uri is not None:  # only then: other services' revisions stay as they were
        serving["source"] = spec.model.source.model_dump(mode="json", exclude_none=True)
    draft = draft_source(spec)
    if draft is not None:  # likewise
        serving["draft"] = draft.model_dump(mode="json", exclude_none=True)
    return hashlib.sha256(json.dumps(serving, sort_keys=True).encode()).hexdigest()[:10]


def shadow_spec(spec: LLMServiceSpec) -> LLMServiceSpec | None:
    """The shadow's resolved spec: the primary's, with what spec.rollout.shadow sets replaced."""
    shadow = spec.rollout.shadow if spec.rollout else None
    if shadow is None:
        return None
    update: dict[str, Any] = {"replicas": shadow.replicas, "scaling": None}
    for field in ("model", "image", "engine", "quantization"):
        if getattr(shadow, field) is not None:
            update[field] = getattr(shadow, field)
    return spec.model_copy(update=update)


def shadow_revision(svc: LLMService, spec: LLMServiceSpec) -> str:
    # Salted: a shadow identical to the primary is still told apart from it by the router.
    return revision_of(svc, spec, salt="shadow")


def spec_annotation(spec: LLMServiceSpec) -> str:
    return json.dumps(spec.model_dump(mode="json", by_alias=True, exclude_none=True))


def spec_from_annotation(deployment: dict[str, Any] | None) -> LLMServiceSpec | None:
    """The resolved spec a live engine Deployment runs, or None (absent, or unreadable)."""
    raw = ((deployment or {}).get("metadata", {}).get("annotations") or {}).get(SPEC_ANNOTATION)
    if not raw:
        return None
    try:
        return LLMServiceSpec.model_validate_json(raw)
    except ValueError:
        return None


def served_name(svc: LLMService) -> str:
    return svc.spec.model.served_name or svc.metadata.name


def endpoint_url(svc: LLMService, opts: RenderOptions = RenderOptions()) -> str:
    host = f"{svc.metadata.name}.{svc.metadata.namespace or 'default'}.svc.{opts.cluster_domain}"
    return f"http://{host}:{ENGINE_PORT}/v1"


def check_servable(spec: LLMServiceSpec) -> None:
    """Rules about what this engine can serve, on the spec as resolved with its policy (the
    models' own validators, and the CRD's CEL rules on 1.25+, see only one side of a merge)."""
    problems = []
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
    from_path = spec.model.source.pvc is None and spec.model.source.uri is None
    bundled = bundled_name(model_path(spec)) if from_path else None
    tensor = spec.parallelism.tensor
    if bundled is not None and tensor > BUNDLED_KV_HEADS[bundled]:
        problems.append(
            f"spec.parallelism.tensor ({tensor}) cannot split {bundled}: it has "
            f"{BUNDLED_KV_HEADS[bundled]} key-value heads and each rank needs at least one"
        )
    if spec.quantization == "fp8" and not gpus:
        problems.append("spec.quantization fp8 needs a Hopper GPU: set spec.resources.gpu.count")
    elif (
        spec.quantization == "gguf"
        and not _is_gguf(model_path(spec))
        # A download's files are known once it ran (the engine says if none is a GGUF).
        and download_uri(spec) is None
    ):
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
    problems += _speculative_problems(spec)
    if problems:
        raise SpecError("; ".join(problems))


def _speculative_problems(spec: LLMServiceSpec) -> list[str]:
    """spec.speculative as merged with the policy: what one side alone could not show, then the
    engine's own check of the flag's JSON (its defaults fill what neither side set)."""
    spec_cfg = spec.speculative
    if spec_cfg is None or spec_cfg.enabled is False:
        return []
    if spec_cfg.draft_model is not None and spec_cfg.method not in (None, "draft_model"):
        return [f"spec.speculative.draftModel goes with method draft_model, not {spec_cfg.method}"]
    if spec_cfg.method == "draft_model" and spec_cfg.draft_model is None:
        return ["spec.speculative.draftModel: method draft_model needs the draft's source"]
    draft = draft_source(spec)
    model_cache = spec.model.source.cache
    if (
        draft is not None
        and draft.cache is not None
        and model_cache is not None
        and draft.cache.claim_name != model_cache.claim_name
    ):
        return [
            "spec.speculative.draftModel.source.cache: the pod has one model cache; use "
            f"spec.model.source.cache's claim ({model_cache.claim_name}) or leave it unset"
        ]
    from kvpilot_engine.spec_decode.config import SpeculativeConfig

    try:
        SpeculativeConfig.parse(speculative_config(spec))
    except (TypeError, ValueError) as e:
        return [f"spec.speculative: {str(e).replace('speculative_config', 'the engine')}"]
    return []


def desired_replicas(spec: LLMServiceSpec) -> int:
    """spec.replicas (the autoscaler's or `kubectl scale`'s), clamped to the scaling bounds."""
    scaling = spec.scaling
    assert scaling is not None and scaling.min_replicas is not None  # resolved spec
    low = 0 if scaling.scale_to_zero else scaling.min_replicas
    high = scaling.max_replicas if scaling.max_replicas is not None else max(low, 1)
    wanted = spec.replicas if spec.replicas is not None else scaling.min_replicas
    return max(low, min(high, wanted))


def model_claim(spec: LLMServiceSpec) -> tuple[str, str] | None:
    """(claim, path in it) of a model served from a PersistentVolumeClaim: `pvc` with `path`,
    or a `pvc://claim/path` URI (mounted as it is, not copied)."""
    return _claim(spec.model.source)


def download_uri(spec: LLMServiceSpec) -> str | None:
    """The URI an init container downloads before the engine starts (hf://, s3://), or None."""
    return _download(spec.model.source)


def cache_dir(uri: str) -> str:
    """The download's folder in the model cache: one per URI, so a shared cache holds several
    models and a changed URI never reuses another's files."""
    return f"{MODEL_CACHE_MOUNT}/{hashlib.sha256(uri.encode()).hexdigest()[:16]}"


def model_path(spec: LLMServiceSpec) -> str:
    return source_path(spec, spec.model.source, MODELS_MOUNT)


def draft_source(spec: LLMServiceSpec) -> ModelSource | None:
    """The draft model's source when speculation by a draft model is on, else None."""
    spec_cfg = spec.speculative
    if spec_cfg is None or spec_cfg.enabled is False or spec_cfg.draft_model is None:
        return None
    return spec_cfg.draft_model.source


def _download(source: ModelSource | None) -> str | None:
    """A source's URI that an init container downloads (everything but pvc://), or None."""
    uri = source.uri if source is not None else None
    return uri if uri is not None and not uri.startswith("pvc://") else None


def _claim(source: ModelSource) -> tuple[str, str] | None:
    """(claim, path in it) of a source on a PersistentVolumeClaim, or None."""
    if source.pvc is not None:
        return source.pvc.claim_name, source.path or ""
    if source.uri is not None and source.uri.startswith("pvc://"):
        claim, _, path = source.uri.removeprefix("pvc://").strip("/").partition("/")
        return claim, path
    return None


def claim_mount(spec: LLMServiceSpec, claim: str, own: str) -> str:
    """Where a draft's or an adapter's claim is mounted: the served model's mount when it is the
    model's claim too, else `own`."""
    model = model_claim(spec)
    return MODELS_MOUNT if model is not None and model[0] == claim else own


def source_path(spec: LLMServiceSpec, source: ModelSource, own_mount: str) -> str:
    """A source's weights inside the engine container: its download's folder in the model
    cache, its folder on its claim (mounted by `claim_mount`, at `own_mount` unless it is the
    served model's claim), else its path (in the image, or a bundled model's name)."""
    uri = _download(source)
    if uri is not None:
        return cache_dir(uri)
    claim = _claim(source)
    if claim is None:
        assert source.path is not None
        return source.path
    return f"{claim_mount(spec, claim[0], own_mount)}/{claim[1].lstrip('/')}".rstrip("/")


def draft_model_path(spec: LLMServiceSpec) -> str | None:
    """The draft's weights inside the engine container (speculative_config's `model`)."""
    draft = draft_source(spec)
    return None if draft is None else source_path(spec, draft, DRAFT_MODELS_MOUNT)


# spec.speculative's fields that are the engine's speculative_config keys, by the same names
# (vLLM's).
SPECULATIVE_KEYS = (
    "method",
    "num_speculative_tokens",
    "prompt_lookup_min",
    "prompt_lookup_max",
    "suffix_cache_requests",
    "disable_by_batch_size",
    "adaptive",
)


def speculative_config(spec: LLMServiceSpec) -> dict[str, Any] | None:
    """`--speculative-config`'s JSON for a resolved spec, or None when speculation is off. Only
    what is set, so the engine's defaults stay the engine's; `method` always (draft_model when
    only a draft is given, as vLLM infers it from `model`)."""
    spec_cfg = spec.speculative
    if spec_cfg is None or spec_cfg.enabled is False:
        return None
    config: dict[str, Any] = {}
    for key in SPECULATIVE_KEYS:
        value = getattr(spec_cfg, key)
        if value is not None:
            config[key] = value
    draft = draft_model_path(spec)
    config["method"] = spec_cfg.method or ("draft_model" if draft is not None else "ngram")
    if draft is not None:
        config["model"] = draft
    return config


# An adapter on a claim other than the served model's: mounted at /adapters/<claim>.
ADAPTERS_MOUNT = "/adapters"


@dataclass(frozen=True)
class AdapterVariant:
    """One adapter folder an engine serves: spec.adapters[] itself (role stable), its canary or
    its shadow. The engines know it as `lora_name`; the router finds it by `path` (the folder is
    per source, so a version keeps its path whatever name an engine gives it)."""

    adapter: str  # spec.adapters[].name
    served: str  # what clients send as `model`
    role: str  # stable | canary | shadow
    lora_name: str
    source: ModelSource
    path: str


def adapter_variants(spec: LLMServiceSpec) -> list[AdapterVariant]:
    """Every adapter folder the engines load, in spec order: each adapter, then its canary and
    shadow under derived names (`<served>@canary`; served names have no @)."""
    out = []
    for a in spec.adapters or []:
        versions = [("stable", a.served, a.source)]
        if a.canary is not None:
            versions.append(("canary", f"{a.served}@canary", a.canary.source))
        if a.shadow is not None:
            versions.append(("shadow", f"{a.served}@shadow", a.shadow.source))
        for role, lora_name, source in versions:
            claim = _claim(source)
            own = f"{ADAPTERS_MOUNT}/{claim[0]}" if claim is not None else ""
            path = source_path(spec, source, own)
            out.append(AdapterVariant(a.name, a.served, role, lora_name, source, path))
    return out


def lora_args(spec: LLMServiceSpec) -> list[str]:
    """`--enable-lora ... --lora-modules name=path ...` (vLLM's flags), only with adapters.

    The adapters themselves load at start-up (a broken one fails the engine's start: the
    service is Degraded and the rolling update stops with the old engines serving). A canary's
    or a shadow's version is downloaded with them but loaded by the router when it first sends
    it a request (runtime loading, on for that alone): a broken new version then fails its
    canary's requests, which the canary's analysis sees and rolls back, instead of every new
    engine's start."""
    variants = adapter_variants(spec)
    if not variants:
        return []
    args = ["--enable-lora"]
    engine = spec.engine
    if engine is not None:
        for flag, value in (
            ("--max-loras", engine.max_loras),
            ("--max-lora-rank", engine.max_lora_rank),
            ("--max-cpu-loras", engine.max_cpu_loras),
        ):
            if value is not None:
                args += [flag, str(value)]
    if any(v.role != "stable" for v in variants):
        args.append("--allow-runtime-lora-updating")
    stable = [f"{v.lora_name}={v.path}" for v in variants if v.role == "stable"]
    return [*args, "--lora-modules", *stable]


def adapter_problems(svc: LLMService, spec: LLMServiceSpec) -> list[str]:
    """What the models cannot see: the default served name (the service's name)."""
    problems = []
    for i, a in enumerate(spec.adapters or []):
        if a.served == served_name(svc):
            problems.append(
                f"spec.adapters[{i}].servedName: {a.served!r} is the model's served name; "
                "clients could not ask for the base model"
            )
    return problems


def _adapter_download_name(v: AdapterVariant) -> str:
    return f"adapter-{v.adapter}" + ("" if v.role == "stable" else f"-{v.role}")


def _is_gguf(path: str) -> bool:
    return path.lower().endswith(".gguf") or is_bundled(path)  # every bundled model is a GGUF


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
        if engine.tool_call_parser is not None:
            args += ["--enable-auto-tool-choice", "--tool-call-parser", engine.tool_call_parser]
        if engine.scheduling_policy == "priority":
            # Priority comes from the routers (X-KVPilot-Priority, by the caller's API key), which
            # drop a client's own; only they reach the engines (NetworkPolicy, API key).
            args.append("--trust-priority-header")
    spec_config = speculative_config(spec)
    if spec_config is not None:
        args += ["--speculative-config", json.dumps(spec_config, sort_keys=True)]
    args += lora_args(spec)
    if engine is not None:
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


def _metadata(svc: LLMService, name: str, component: str = "engine") -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": svc.metadata.namespace or "default",
        "labels": common_labels(svc.metadata.name, component),
    }
    owners = _owner_references(svc)
    if owners:
        meta["ownerReferences"] = owners
    return meta


# Requests for what the service does not set (a policy has no resources): without any, a pod is
# BestEffort, the first evicted under memory pressure, and packed onto nodes with no regard for
# it. Modest (SmolLM2 on CPU fits in them), and requests only: a default memory limit could
# OOM-kill a larger model, which the user has not sized.
DEFAULT_ENGINE_REQUESTS = {"cpu": "1", "memory": "2Gi"}
# Tensor-parallel ranks exchange activations through /dev/shm (NCCL's shared-memory transport);
# a container's own is 64 MiB. Memory-backed, so it counts against the pod's memory.
SHM_SIZE_LIMIT = "2Gi"


def _container_resources(spec: LLMServiceSpec) -> dict[str, Any]:
    res = spec.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    requests["cpu"] = str(res.cpu) if res.cpu is not None else DEFAULT_ENGINE_REQUESTS["cpu"]
    if res.memory is not None:
        # Memory is not compressible: the limit equals the request so the KV pool sized at
        # start-up is never OOM-killed later by a neighbour.
        requests["memory"] = limits["memory"] = str(res.memory)
    else:
        requests["memory"] = DEFAULT_ENGINE_REQUESTS["memory"]
    if res.gpu.count:
        requests[res.gpu.resource_name] = limits[res.gpu.resource_name] = str(res.gpu.count)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


CONTAINER_SECURITY: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}
POD_SECURITY: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": NON_ROOT_UID,
    "runAsGroup": NON_ROOT_UID,
    "fsGroup": NON_ROOT_UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _probes() -> dict[str, Any]:
    http_get = {"port": "http"}
    return {
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
    }


def _api_key_env(spec: LLMServiceSpec, name: str) -> list[dict[str, Any]]:
    """The service's API key (spec.router.apiKeySecret, entry `api-key`) as env `name`: clients
    send it to the routers, the routers send it to the engines, which refuse anyone without it."""
    secret = spec.router.api_key_secret
    if not secret:
        return []
    ref = {"secretKeyRef": {"name": secret, "key": "api-key"}}
    return [{"name": name, "valueFrom": ref}]


def _scrape_annotations(port: int) -> dict[str, str]:
    return {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
        "prometheus.io/path": "/metrics",
    }


def deployment(
    svc: LLMService,
    spec: LLMServiceSpec,
    opts: RenderOptions,
    *,
    track: str = "stable",
    replicas: int | None = None,
) -> dict[str, Any]:
    """An engine Deployment: `track` stable (the service's own), canary, or shadow."""
    name = svc.metadata.name
    component = "shadow" if track == "shadow" else "engine"
    revision = shadow_revision(svc, spec) if track == "shadow" else revision_of(svc, spec)
    pod_labels = {**common_labels(name, component), TRACK_LABEL: track, REVISION_LABEL: revision}
    drain = (spec.engine.drain_timeout_seconds if spec.engine else None) or DEFAULT_DRAIN_SECONDS
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    claim = model_claim(spec)
    if claim is not None:
        volumes.append(
            {
                "name": "models",
                "persistentVolumeClaim": {"claimName": claim[0], "readOnly": True},
            }
        )
        mounts.append({"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True})
    draft = draft_source(spec)
    draft_claim = _claim(draft) if draft is not None else None
    if draft_claim is not None and (
        claim_mount(spec, draft_claim[0], DRAFT_MODELS_MOUNT) == DRAFT_MODELS_MOUNT
    ):
        volumes.append(
            {
                "name": "draft-models",
                "persistentVolumeClaim": {"claimName": draft_claim[0], "readOnly": True},
            }
        )
        mounts.append({"name": "draft-models", "mountPath": DRAFT_MODELS_MOUNT, "readOnly": True})
    variants = adapter_variants(spec)
    # Each source to download (the model, the draft, every adapter version) in an init container
    # of its own, with its own credentials, into the one model cache.
    downloads = [
        (DOWNLOAD_CONTAINER, spec.model.source),
        (DRAFT_DOWNLOAD_CONTAINER, draft),
        *((_adapter_download_name(v), v.source) for v in variants),
    ]
    init_containers = [
        download_container(spec, opts, source=source, name=container)
        for container, source in downloads
        if source is not None and _download(source) is not None
    ]
    if init_containers:
        volumes.append(_model_cache_volume(spec))
        mounts.append({"name": "model-cache", "mountPath": MODEL_CACHE_MOUNT, "readOnly": True})
    claims = sorted({c[0] for v in variants if (c := _claim(v.source)) is not None})
    for claim in claims:
        mount = claim_mount(spec, claim, f"{ADAPTERS_MOUNT}/{claim}")
        if mount == MODELS_MOUNT:
            continue  # the served model's claim, mounted already
        volume = f"adapters-{hashlib.sha256(claim.encode()).hexdigest()[:8]}"
        volumes.append(
            {"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        )
        mounts.append({"name": volume, "mountPath": mount, "readOnly": True})
    if spec.parallelism.tensor > 1:
        shm = {"medium": "Memory", "sizeLimit": SHM_SIZE_LIMIT}
        volumes.append({"name": "dshm", "emptyDir": shm})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
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
            *_api_key_env(spec, "KVPILOT_API_KEY"),  # `kvpilot serve --api-key`
        ],
        "resources": _container_resources(spec),
        "volumeMounts": mounts,
        # Loading weights can take minutes; the startup probe holds liveness off until then.
        "startupProbe": {
            "httpGet": {**http_get, "path": "/health"},
            "periodSeconds": 5,
            "failureThreshold": 180,
        },
        **_probes(),
        "securityContext": CONTAINER_SECURITY,
        # A failed start's last log line (the engine logs why) becomes the termination message,
        # which the operator reports as Degraded=EngineFailing.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        **({"initContainers": init_containers} if init_containers else {}),
        "containers": [container],
        "volumes": volumes,
        "securityContext": POD_SECURITY,
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
    metadata = _metadata(svc, engine_name(name, track), component)
    metadata["labels"][TRACK_LABEL] = track
    metadata["annotations"] = {SPEC_ANNOTATION: spec_annotation(spec)}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": desired_replicas(spec) if replicas is None else replicas,
            "selector": {"matchLabels": {**selector_labels(name, component), TRACK_LABEL: track}},
            # Never drop below the serving replicas during a rollout: surge first.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "revisionHistoryLimit": 3,
            "progressDeadlineSeconds": 1200,
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": _scrape_annotations(ENGINE_PORT),
                },
                "spec": pod_spec,
            },
        },
    }


def _model_cache_volume(spec: LLMServiceSpec) -> dict[str, Any]:
    draft = draft_source(spec)
    # One cache per pod: the served model's claim, else the draft's (check_servable refuses two).
    cache = spec.model.source.cache or (draft.cache if draft is not None else None)
    if cache is not None:  # ReadWriteMany, shared: a scale-up finds the weights downloaded
        return {"name": "model-cache", "persistentVolumeClaim": {"claimName": cache.claim_name}}
    return {"name": "model-cache", "emptyDir": {}}


def download_container(
    spec: LLMServiceSpec, opts: RenderOptions, *, source: ModelSource, name: str
) -> dict[str, Any]:
    """The init container `name` that fetches `source` (the model's, the draft's, an adapter
    version's) into the model cache: `kvpilot download` from the engine image, credentials from
    the named Secret by reference (the operator never reads Secrets), its result (the pinned
    revision) in the termination message and, when it fails, its last log line (the reason)."""
    uri = _download(source)
    assert uri is not None
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if source.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": source.endpoint})
    if source.region:
        env.append({"name": "AWS_REGION", "value": source.region})
    if source.secret_name:
        for key, optional in SOURCE_SECRET_KEYS.get(uri.split("://", 1)[0], []):
            ref = {"name": source.secret_name, "key": key}
            if optional:
                ref["optional"] = True
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    return {
        "name": name,
        "image": spec.image or opts.engine_image,
        "command": ["kvpilot", "download"],
        "args": [
            uri,
            cache_dir(uri),
            "--termination-message-path",
            "/dev/termination-log",
        ],
        "env": env,
        "resources": DOWNLOAD_RESOURCES,
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "model-cache", "mountPath": MODEL_CACHE_MOUNT},
        ],
        "securityContext": CONTAINER_SECURITY,
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def service(svc: LLMService, spec: LLMServiceSpec, opts: RenderOptions) -> dict[str, Any]:
    name = svc.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(svc, name),
        # Clients reach the routers; the routers pick engines (weights, load, prefix affinity).
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(name, "router"),
            "ports": [
                {"name": "http", "port": ROUTER_PORT, "targetPort": "http", "protocol": "TCP"}
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


def _label_selector(labels: dict[str, str]) -> dict[str, Any]:
    # Everything is `{}`, not `{"matchLabels": {}}`: the API server stores the empty map away, so
    # every server-side apply of the latter would look like a change (and wake the operator).
    return {"matchLabels": dict(labels)} if labels else {}


def _scraper_peer(opts: RenderOptions) -> dict[str, Any]:
    peer: dict[str, Any] = {"podSelector": _label_selector(opts.scraper_pod_labels)}
    if opts.scraper_namespace_labels is not None:
        peer["namespaceSelector"] = _label_selector(opts.scraper_namespace_labels)
    return peer


def network_policies(svc: LLMService, opts: RenderOptions) -> list[dict[str, Any]]:
    """Ingress rules for the service's pods. Engines (stable, canary, shadow) take connections
    only from this service's routers and the metrics scraper, so the router's API key, admission
    and canary weights cannot be gone around from elsewhere on the pod network; the routers take
    them from anywhere (a namespace's default-deny policy would otherwise cut clients off).
    Enforced by the cluster's network plugin; the kubelet's probes come from the node and are
    not subject to it on the common plugins."""
    name = svc.metadata.name
    engine_port = [{"protocol": "TCP", "port": ENGINE_PORT}]
    engines = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(svc, engine_name(name)),
        "spec": {
            "podSelector": {
                "matchLabels": {SERVICE_LABEL: name},
                "matchExpressions": [
                    {"key": COMPONENT_LABEL, "operator": "In", "values": ["engine", "shadow"]}
                ],
            },
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": selector_labels(name, "router")}}],
                    "ports": engine_port,
                },
                {"from": [_scraper_peer(opts)], "ports": engine_port},
            ],
        },
    }
    routers = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(svc, router_name(name), "router"),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(name, "router")},
            "policyTypes": ["Ingress"],
            "ingress": [{"ports": [{"protocol": "TCP", "port": ROUTER_PORT}]}],
        },
    }
    return [engines, routers]


@dataclass(frozen=True)
class Plan:
    """Which revisions serve now. Decided by reconcile from the spec, the live stable Deployment
    and status.canary; without a rollout in flight, the stable revision is the spec itself."""

    stable: LLMServiceSpec
    canary: LLMServiceSpec | None = None
    canary_weight: int = 0  # percent of the primary traffic
    # Percent of each adapter's requests its canary gets (status.adapters[].canary), by name.
    adapter_canary: dict[str, int] = dataclasses.field(default_factory=dict)


def canary_replicas(replicas: int, weight: int) -> int:
    """Enough canary engines for its share, never none while it takes traffic."""
    return 0 if replicas == 0 else max(1, math.ceil(replicas * weight / 100))


def routes(svc: LLMService, spec: LLMServiceSpec, plan: Plan) -> dict[str, Any]:
    """The router's table (ConfigMap `<service>-router`, entry routes.json)."""
    stable = revision_of(svc, plan.stable)
    revisions = [{"name": stable, "weight": 100, "role": "stable"}]
    if plan.canary is not None:
        canary = revision_of(svc, plan.canary)
        if canary != stable:  # while promoting, both Deployments run the new revision
            revisions = [
                {"name": stable, "weight": 100 - plan.canary_weight, "role": "stable"},
                {"name": canary, "weight": plan.canary_weight, "role": "canary"},
            ]
    shadow = spec.rollout.shadow if spec.rollout else None
    shadow_of = shadow_spec(spec)
    table = {
        "service": svc.metadata.name,
        "revisions": revisions,
        "shadow": None
        if shadow is None or shadow_of is None
        else {
            "revision": shadow_revision(svc, shadow_of),
            "mirrorPercent": shadow.mirror_percent,
            "maxRps": shadow.max_rps,
        },
    }
    if spec.adapters:
        table["adapters"] = adapter_routes(spec, plan.adapter_canary)
    return table


def adapter_routes(spec: LLMServiceSpec, canary_weights: dict[str, int]) -> list[dict[str, Any]]:
    """routes.json's `adapters`: each adapter's versions by folder, with their shares."""
    by_adapter: dict[str, list[AdapterVariant]] = {}
    for v in adapter_variants(spec):
        by_adapter.setdefault(v.adapter, []).append(v)
    out = []
    for a in spec.adapters or []:
        canary = canary_weights.get(a.name, 0) if a.canary is not None else 0
        entry: dict[str, Any] = {"name": a.served, "variants": [], "shadow": None}
        for v in by_adapter[a.name]:
            if v.role == "shadow":
                assert a.shadow is not None
                entry["shadow"] = {
                    "path": v.path,
                    "mirrorPercent": a.shadow.mirror_percent,
                    "maxRps": a.shadow.max_rps,
                }
                continue
            weight = canary if v.role == "canary" else 100 - canary
            entry["variants"].append({"path": v.path, "weight": weight, "role": v.role})
        out.append(entry)
    return out


BATCH_DIR = "/var/lib/kvpilot/batch"


def batch_args(batch: BatchSpec, slo: SLOSpec | None = None) -> list[str]:
    """`kvpilot router`'s Batch API flags for spec.batch; the service's SLO, which batch
    admission keeps interactive traffic under."""
    args = ["--batch-dir", BATCH_DIR]
    if batch.max_file_bytes is not None:
        args += ["--batch-max-file-bytes", str(batch.max_file_bytes)]
    if batch.max_concurrent_requests is not None:
        args += ["--batch-max-in-flight", str(batch.max_concurrent_requests)]
    targets = [t for t in (slo.ttft, slo.tpot) if t is not None] if slo is not None else []
    if slo is not None and slo.ttft is not None:
        args += ["--batch-slo-ttft-ms", str(slo.ttft.target_ms)]
    if slo is not None and slo.tpot is not None:
        args += ["--batch-slo-tpot-ms", str(slo.tpot.target_ms)]
    if targets:
        # One percentile for both: the stricter one.
        args += ["--batch-slo-percentile", str(max(t.percentile for t in targets))]
    return args


def batch_volume(batch: BatchSpec) -> dict[str, Any]:
    claim = batch.storage.claim_name if batch.storage is not None else None
    if claim:
        return {"name": "batch", "persistentVolumeClaim": {"claimName": claim}}
    return {"name": "batch", "emptyDir": {}}


def router_objects(
    svc: LLMService, spec: LLMServiceSpec, plan: Plan, opts: RenderOptions
) -> list[dict[str, Any]]:
    """The router: its routes ConfigMap, a ServiceAccount allowed to read exactly that and the
    service's pods, and its Deployment."""
    name = svc.metadata.name
    rname = router_name(name)
    table = routes(svc, spec, plan)
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(svc, rname, "router"),
        "data": {ROUTES_KEY: json.dumps(table, indent=2, sort_keys=True)},
    }
    account = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(svc, rname, "router"),
        "automountServiceAccountToken": False,
    }
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(svc, rname, "router"),
        "rules": [
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
            # Its own routes only: list and watch by name (a field selector) pass resourceNames.
            {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "resourceNames": [rname],
                "verbs": ["list", "watch"],
            },
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(svc, rname, "router"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": rname},
        "subjects": [
            {
                "kind": "ServiceAccount",
                "name": rname,
                "namespace": svc.metadata.namespace or "default",
            }
        ],
    }
    args = [
        "router",
        "--host",
        "0.0.0.0",
        "--port",
        str(ROUTER_PORT),
        "--namespace",
        svc.metadata.namespace or "default",
        "--service",
        name,
    ]
    if spec.router.prefix_chars is not None:
        args += ["--prefix-chars", str(spec.router.prefix_chars)]
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    if spec.batch is not None and spec.batch.enabled:
        args += batch_args(spec.batch, spec.slo)
        volumes.append(batch_volume(spec.batch))
        mounts.append({"name": "batch", "mountPath": BATCH_DIR})
    env: list[dict[str, Any]] = [
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *_api_key_env(spec, "KVPILOT_API_KEY"),  # what clients must send
        *_api_key_env(spec, "KVPILOT_UPSTREAM_API_KEY"),  # what the router sends the engines
    ]
    container = {
        "name": "router",
        "image": opts.router_image,
        "command": ["kvpilot"],
        "args": args,
        "ports": [{"name": "http", "containerPort": ROUTER_PORT, "protocol": "TCP"}],
        "env": env,
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        **_probes(),
        "securityContext": CONTAINER_SECURITY,
        **({"volumeMounts": mounts} if mounts else {}),
    }
    labels = common_labels(name, "router")
    router = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(svc, rname, "router"),
        "spec": {
            "replicas": spec.router.replicas,
            "selector": {"matchLabels": selector_labels(name, "router")},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": {"labels": labels, "annotations": _scrape_annotations(ROUTER_PORT)},
                "spec": {
                    "containers": [container],
                    **({"volumes": volumes} if volumes else {}),
                    "serviceAccountName": rname,
                    # The router reads its routes and the engine pods from the API server.
                    "automountServiceAccountToken": True,
                    "securityContext": POD_SECURITY,
                    # Streams in flight finish (or time out) before the router goes.
                    "terminationGracePeriodSeconds": 60,
                    "enableServiceLinks": False,
                },
            },
        },
    }
    return [config_map, account, role, binding, router]


def render(
    svc: LLMService,
    spec: LLMServiceSpec,
    opts: RenderOptions = RenderOptions(),
    plan: Plan | None = None,
) -> list[dict[str, Any]]:
    """Every object an LLMService becomes, given its resolved spec and the rollout plan (default:
    the spec serves alone). Raises SpecError."""
    check_servable(spec)
    problems = adapter_problems(svc, spec)
    if problems:
        raise SpecError("; ".join(problems))
    plan = plan or Plan(stable=spec)
    replicas = desired_replicas(spec)
    objects = [deployment(svc, plan.stable, opts, replicas=replicas)]
    if plan.canary is not None:
        check_servable(plan.canary)
        objects.append(
            deployment(
                svc,
                plan.canary,
                opts,
                track="canary",
                replicas=canary_replicas(replicas, plan.canary_weight),
            )
        )
    shadow = shadow_spec(spec)
    if shadow is not None:
        check_servable(shadow)
        objects.append(deployment(svc, shadow, opts, track="shadow", replicas=shadow.replicas))
    return [
        *objects,
        *router_objects(svc, spec, plan, opts),
        service(svc, spec, opts),
        pod_disruption_budget(svc, spec, opts),
        *network_policies(svc, opts),
    ]


def optional_objects(svc: LLMService) -> list[tuple[str, str, str]]:
    """(apiVersion, kind, name) of what a service owns only some of the time: deleted by
    reconcile when the plan no longer renders it."""
    name = svc.metadata.name
    return [
        ("apps/v1", "Deployment", engine_name(name, "canary")),
        ("apps/v1", "Deployment", engine_name(name, "shadow")),
    ]
