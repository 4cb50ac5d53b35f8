"""The kvpilot.io/v1alpha1 API: `LLMService` and `ServingPolicy` as pydantic v2 models.

These models are the one source of truth: `kvpilot crds` generates `crds/*.yaml` from them, the
operator parses what the API server hands it with them, and `kvpilot render` validates files with
them. Field names are camelCase on the wire (Kubernetes convention), snake_case in Python.

Fields a ServingPolicy can supply (engine knobs, SLO, scaling, quantization) carry no default in
the schema: an unset field means "take the policy's value, else the built-in default"
(`kvpilot_operator.api.policies.resolve_spec`). Only fields no policy touches have schema defaults.
"""

from __future__ import annotations

import itertools
import re
from typing import Annotated, Any, ClassVar, Literal

from kvpilot_engine.contracts import QUANTIZATIONS
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

GROUP = "kvpilot.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Kubernetes quantities accept both `cpu: 2` and `cpu: "500m"`; the string form is checked with
# Kubernetes' own grammar (resource.Quantity, without the sign: no request is negative), so a
# `16GB` is refused at apply instead of failing the Deployment's apply later.
INT_OR_STRING: dict[str, Any] = {"x-kubernetes-int-or-string": True}
QUANTITY_PATTERN = (
    r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
DURATION_PATTERN = r"^[0-9]+(s|m|h)$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# An LLMService's name is also its Service's, and Service names are DNS-1035 labels: a letter
# first, at most 63 characters.
DNS_1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# Label keys ([prefix/]name) and values, as the API server checks them on the pods we render.
LABEL_KEY = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
# A container image reference: [registry[:port]/]repository[:tag][@digest], lower-case
# repository, no spaces (the kubelet would fail to pull it, with the pod stuck).
IMAGE_PATTERN = (
    r"^([a-zA-Z0-9.-]+(:[0-9]+)?/)?[a-z0-9]+([._/-][a-z0-9]+)*"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?$"
)

# The `--quantization` methods this release's engine implements (the engine's own list).
Quantization = Literal[QUANTIZATIONS]  # type: ignore[valid-type]


def _quantity(value: int | str) -> int | str:
    if isinstance(value, int) and value < 0:
        raise ValueError("a quantity cannot be negative")
    if isinstance(value, str) and not re.fullmatch(QUANTITY_PATTERN, value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. `4`, `500m`, `16Gi`)")
    return value


Quantity = Annotated[
    int | str,
    Field(
        json_schema_extra={**INT_OR_STRING, "pattern": QUANTITY_PATTERN},
        union_mode="left_to_right",
    ),
    AfterValidator(_quantity),
]

# `kvpilot serve` flags the operator writes itself, with the field that sets each: extraArgs may
# not repeat them (the engine would take the last, silently overriding the operator's).
MANAGED_FLAGS: dict[str, str] = {
    "--host": "the operator (the pod's address)",
    "--port": "the operator (the engine port the Service and probes use)",
    "--model": "spec.model.source",
    "--served-model-name": "spec.model.servedName",
    "--dtype": "spec.model.dtype",
    "--max-model-len": "spec.model.maxContext",
    "--quantization": "spec.quantization",
    "--tensor-parallel-size": "spec.parallelism.tensor",
    "--device": "spec.resources.gpu.count",
    "--max-num-batched-tokens": "spec.engine.maxNumBatchedTokens",
    "--max-num-seqs": "spec.engine.maxNumSeqs",
    "--block-size": "spec.engine.blockSize",
    "--kv-cache-memory": "spec.engine.kvCacheMemory",
    "--scheduling-policy": "spec.engine.schedulingPolicy",
    "--max-waiting": "spec.engine.maxWaiting",
    "--drain-timeout": "spec.engine.drainTimeoutSeconds",
    "--enable-prefix-caching": "spec.engine.enablePrefixCaching",
    "--no-enable-prefix-caching": "spec.engine.enablePrefixCaching",
    "--enable-chunked-prefill": "spec.engine.enableChunkedPrefill",
    "--no-enable-chunked-prefill": "spec.engine.enableChunkedPrefill",
    "--enable-auto-tool-choice": "spec.engine.toolCallParser",
    "--tool-call-parser": "spec.engine.toolCallParser",
    "--enable-lora": "spec.adapters",
    "--lora-modules": "spec.adapters",
    "--allow-runtime-lora-updating": "spec.adapters",
    "--max-loras": "spec.engine.maxLoras",
    "--max-lora-rank": "spec.engine.maxLoraRank",
    "--max-cpu-loras": "spec.engine.maxCpuLoras",
    "--speculative-config": "spec.speculative",
}


def cel(*rules: tuple[str, str]) -> dict[str, Any]:
    """CEL rules (`x-kubernetes-validations`) for clusters that run them (1.25+), as (rule,
    message) pairs. Each restates a pydantic validator of the same model, which older clusters
    rely on through the operator; tests/operator/test_cel.py evaluates both on the same specs."""
    return {"x-kubernetes-validations": [{"rule": r, "message": m} for r, m in rules]}


def _flag_name(arg: str) -> str:
    return arg.split("=", 1)[0]


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=False
    )


# --- spec -------------------------------------------------------------------------------------


class PVCSource(_Model):
    claim_name: str = Field(min_length=1, description="PersistentVolumeClaim holding the model.")


# A model source URI (kvpilot_engine.sources): the schemes `kvpilot download` fetches, with the
# same shapes its parser accepts, so an unknown scheme is refused at `kubectl apply`.
SOURCE_URI_PATTERN = (
    r"^(hf://([A-Za-z0-9][-\w.]{0,95}/)?[A-Za-z0-9][-\w.]{0,95}(@[-\w./]+)?"
    r"|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?"
    r"|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?"
    r"|oci://[a-zA-Z0-9.-]+(:[0-9]+)?/[a-z0-9]+([._/-][a-z0-9]+)*"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?)$"
)
# Only with `uri`: where a download comes from and goes to.
URI_ONLY = ("secretName", "endpoint", "region", "cache")


def _source_schema(where: str) -> dict[str, Any]:
    """A model source's schema rules, their messages naming the field at `where`."""
    return {
        "anyOf": [{"required": ["path"]}, {"required": ["pvc"]}, {"required": ["uri"]}],
        **cel(
            (
                "!has(self.pvc) || !has(self.path) || "
                "(!self.path.startsWith('/') && !self.path.contains('..'))",
                f"{where}.path: with pvc, a path relative to the claim's root "
                "(no leading / and no ..)",
            ),
            (
                "!has(self.uri) || (!has(self.path) && !has(self.pvc))",
                f"{where}: one kind of source: uri, or path (with or without pvc)",
            ),
            (
                "has(self.uri) || (" + " && ".join(f"!has(self.{f})" for f in URI_ONLY) + ")",
                f"{where}: secretName, endpoint, region and cache go with uri",
            ),
        ),
    }


class ModelSource(_Model):
    # At least one kind (the API server checks it with anyOf; pydantic with the validator
    # below); not two (CEL on 1.25+, the operator on older clusters).
    model_config = ConfigDict(json_schema_extra=_source_schema("spec.model.source"))
    # The field this source is, in messages (a draft model's source has the same shape).
    where: ClassVar[str] = "spec.model.source"

    # pvc before path: the path's check reads it.
    pvc: PVCSource | None = Field(None, description="Mount this claim read-only at /models.")
    path: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description=(
            "Model inside the engine container: a Hugging Face folder, a GGUF file, or a "
            "bundled model name such as `smollm2`. With `pvc`, relative to the volume."
        ),
    )
    uri: str | None = Field(
        None,
        max_length=2048,
        pattern=SOURCE_URI_PATTERN,
        description=(
            "Weights to download before the engine starts (`kvpilot download` in an init "
            "container, into the model cache): `hf://org/repo[@revision]`, "
            "`s3://bucket[/prefix]`, `oci://registry/repository[:tag|@digest]` (an artifact, "
            "one layer per file), or `pvc://claim[/path]` (mounted, not copied). Pin a Hub "
            "commit (`@<sha>`) or an OCI digest so that replicas started later serve the same "
            "weights."
        ),
    )
    secret_name: str | None = Field(
        None,
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description=(
            "Secret in the service's namespace with the download's credentials: `HF_TOKEN` "
            "for hf://; `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (and optionally "
            "`AWS_SESSION_TOKEN`) for s3://; `OCI_USERNAME` and `OCI_PASSWORD` for oci://. "
            "Passed as environment (secretKeyRef) to the download container only."
        ),
    )
    endpoint: str | None = Field(
        None,
        max_length=2048,
        pattern=r"^https?://[^\s]+$",
        description="s3://: an S3-compatible store's endpoint URL (AWS_ENDPOINT_URL), e.g. "
        "`http://minio.storage:9000`.",
    )
    region: str | None = Field(
        None, max_length=64, pattern=r"^[a-z0-9-]+$", description="s3://: the region (AWS_REGION)."
    )
    cache: PVCSource | None = Field(
        None,
        description=(
            "A ReadWriteMany claim the replicas share as the download cache, so a scale-up "
            "finds the weights there (default: an emptyDir per pod, downloaded by each)."
        ),
    )

    @field_validator("path")
    @classmethod
    def _relative_in_claim(cls, path: str | None, info: ValidationInfo) -> str | None:
        in_claim = path is not None and info.data.get("pvc") is not None
        if in_claim and (path.startswith("/") or ".." in path.split("/")):
            raise ValueError("with pvc, a path relative to the claim's root (no / first, no ..)")
        return path

    @field_validator("uri")
    @classmethod
    def _source_uri(cls, uri: str | None) -> str | None:
        if uri is not None:
            from kvpilot_engine.sources.base import SourceError, parse_uri

            try:
                parse_uri(uri)
            except SourceError as e:
                raise ValueError(str(e)) from e
        return uri

    @model_validator(mode="after")
    def _one_kind(self) -> ModelSource:
        where = self.where
        if self.path is None and self.pvc is None and self.uri is None:
            raise ValueError(f"{where.removeprefix('spec.')} needs `uri`, `path` or `pvc`")
        if self.uri is not None and (self.path is not None or self.pvc is not None):
            raise ValueError(f"{where}: one kind of source: uri, or path (with or without pvc)")
        if self.uri is None:
            stray = [f for f in URI_ONLY if getattr(self, _snake(f)) is not None]
            if stray:
                raise ValueError(
                    f"{where}.{stray[0]}: secretName, endpoint, region and cache go with uri"
                )
        return self


def _snake(name: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name)


class ModelSpec(_Model):
    source: ModelSource = Field(description="Where the weights come from.")
    served_name: str | None = Field(
        None,
        min_length=1,
        max_length=253,
        description="Name clients send as `model` (default: the LLMService's name).",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Weight and activation dtype."
    )
    max_context: int | None = Field(
        None, ge=16, le=1_048_576, description="Maximum tokens per sequence (prompt + output)."
    )


class LatencyTarget(_Model):
    percentile: Literal[50, 90, 95, 99] = Field(95, description="Percentile held to the target.")
    target_ms: int = Field(ge=1, le=600_000, description="Target in milliseconds.")


class SLOSpec(_Model):
    ttft: LatencyTarget | None = Field(None, description="Time to first token.")
    tpot: LatencyTarget | None = Field(None, description="Time per output token after the first.")
    window: str | None = Field(
        None, pattern=DURATION_PATTERN, description="Evaluation window, e.g. `5m`."
    )


class ParallelismSpec(_Model):
    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "self.pipeline == 1",
                "spec.parallelism.pipeline: the engine does not do pipeline parallelism; "
                "use tensor",
            )
        )
    )

    tensor: int = Field(1, ge=1, le=64, description="Tensor-parallel degree (GPUs per replica).")
    pipeline: int = Field(1, ge=1, le=64, description="Pipeline-parallel degree.")


class EngineSpec(_Model):
    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!has(self.maxLoras) || !has(self.maxCpuLoras) "
                "|| self.maxCpuLoras >= self.maxLoras",
                "spec.engine.maxCpuLoras must not be less than spec.engine.maxLoras",
            )
        )
    )

    max_num_batched_tokens: int | None = Field(
        None, ge=16, le=1_048_576, description="Token budget of one engine step."
    )
    max_num_seqs: int | None = Field(None, ge=1, le=4096, description="Sequences per step.")
    block_size: Literal[8, 16, 32, 64] | None = Field(None, description="KV-cache block size.")
    enable_prefix_caching: bool | None = Field(None, description="Hash-chain prefix caching.")
    enable_chunked_prefill: bool | None = Field(None, description="Mix prefill chunks and decodes.")
    scheduling_policy: Literal["fcfs", "priority"] | None = Field(None, description="Queue order.")
    kv_cache_memory: str | None = Field(
        None,
        pattern=r"^[0-9]+(\.[0-9]+)?(B|KB|MB|GB|KiB|MiB|GiB|TiB)?$",
        description="Bytes for the KV pool, e.g. `2GiB` (default: engine's choice).",
    )
    max_waiting: int | None = Field(
        None, ge=1, le=1_000_000, description="Queue bound; beyond it the engine answers 503."
    )
    drain_timeout_seconds: int | None = Field(
        None, ge=0, le=3600, description="On shutdown, time to let in-flight requests finish."
    )
    tool_call_parser: Literal["hermes", "llama3_json", "mistral"] | None = Field(
        None,
        description='Tool calling with tool_choice "auto": how the model writes tool calls '
        "(hermes: <tool_call> JSON, also for models whose chat template has no tool support; "
        'llama3_json; mistral). Unset: "required" and named tool choices only.',
    )
    # LoRA (with spec.adapters), vLLM's names and meanings.
    max_loras: int | None = Field(
        None,
        ge=1,
        le=256,
        description="spec.adapters: adapters in one engine step (device slots; engine default 1).",
    )
    max_lora_rank: int | None = Field(
        None,
        ge=1,
        le=512,
        description="spec.adapters: the largest adapter rank served (engine default 16); an "
        "adapter of a higher rank fails to load.",
    )
    max_cpu_loras: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="spec.adapters: adapters kept in host memory (LRU; default maxLoras).",
    )
    extra_args: list[Annotated[str, Field(max_length=4096)]] | None = Field(
        None,
        max_length=64,
        description="Further `kvpilot serve` flags; not those the operator sets from other fields "
        "(--port, --host, --model, --quantization, ...).",
        json_schema_extra=cel(
            (
                "self.all(a, !["
                + ", ".join(f"'{f}'" for f in MANAGED_FLAGS)
                + "].exists(f, a == f || a.startsWith(f + '=')))",
                "spec.engine.extraArgs: a flag the operator sets from another field "
                "(--host, --port, --model, --dtype, --quantization, ...); use that field",
            )
        ),
    )

    @field_validator("extra_args")
    @classmethod
    def _unmanaged(cls, args: list[str] | None) -> list[str] | None:
        for arg in args or []:
            flag = _flag_name(arg)
            if flag in MANAGED_FLAGS:
                raise ValueError(f"{flag} is set by {MANAGED_FLAGS[flag]}; not in extraArgs")
        return args

    @model_validator(mode="after")
    def _lora_slots(self) -> EngineSpec:
        low, high = self.max_loras, self.max_cpu_loras
        if low is not None and high is not None and high < low:
            raise ValueError(
                f"spec.engine.maxCpuLoras ({high}) must not be less than "
                f"spec.engine.maxLoras ({low})"
            )
        return self


class GPUSpec(_Model):
    count: int = Field(0, ge=0, le=64, description="GPUs per replica.")
    type: str | None = Field(
        None,
        max_length=63,
        pattern=LABEL_VALUE,
        description="GPU product, matched against the node label `nvidia.com/gpu.product`.",
    )
    resource_name: str = Field(
        "nvidia.com/gpu",
        max_length=253,
        pattern=LABEL_KEY,
        description="Extended resource to request.",
    )


class Toleration(_Model):
    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!has(self.operator) || self.operator != 'Exists' || !has(self.value) "
                "|| self.value == ''",
                "spec.resources.tolerations: operator Exists takes no value",
            ),
            (
                "has(self.key) && self.key != '' || has(self.operator) && self.operator == "
                "'Exists'",
                "spec.resources.tolerations: an empty key needs operator Exists",
            ),
            (
                "!has(self.tolerationSeconds) || has(self.effect) && self.effect == 'NoExecute'",
                "spec.resources.tolerations: tolerationSeconds needs effect NoExecute",
            ),
        )
    )

    key: str | None = Field(None, max_length=316, pattern=r"^$|" + LABEL_KEY[1:])
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = Field(None, max_length=63, pattern=LABEL_VALUE)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Toleration:
        # The API server's own rules for a pod's tolerations, checked before a pod is rendered.
        if self.operator == "Exists" and self.value:
            raise ValueError("operator Exists takes no value")
        if not self.key and self.operator != "Exists":
            raise ValueError("an empty key needs operator Exists")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds needs effect NoExecute")
        return self


class ResourcesSpec(_Model):
    gpu: GPUSpec = Field(default_factory=GPUSpec, json_schema_extra={"default": {}})
    cpu: Quantity | None = Field(None, description="CPU request (and limit), e.g. `4` or `500m`.")
    memory: Quantity | None = Field(None, description="Memory request and limit, e.g. `16Gi`.")
    node_selector: dict[str, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]] | None = (
        Field(None, description="Node labels the engine pods must run on.")
    )
    tolerations: list[Toleration] | None = Field(None, max_length=64)

    @field_validator("node_selector")
    @classmethod
    def _label_keys(cls, selector: dict[str, str] | None) -> dict[str, str] | None:
        # Keys: a CRD schema has no patternProperties, so only here (and the API server's check
        # of the pods, which would come too late).
        for key in selector or {}:
            if len(key) > 316 or not re.fullmatch(LABEL_KEY, key):
                raise ValueError(f"{key!r} is not a label key ([prefix/]name)")
        return selector


class ScalingSpec(_Model):
    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!has(self.minReplicas) || !has(self.maxReplicas) "
                "|| self.minReplicas <= self.maxReplicas",
                "spec.scaling.minReplicas must not be greater than spec.scaling.maxReplicas",
            )
        )
    )

    min_replicas: int | None = Field(None, ge=0, le=1000)
    max_replicas: int | None = Field(None, ge=1, le=1000)
    scale_to_zero: bool | None = Field(None, description="Allow 0 replicas after an idle period.")
    idle_seconds: int | None = Field(
        None, ge=30, le=86_400, description="Idle time before scaling to zero."
    )
    mode: Literal["active", "advisory"] | None = Field(
        None, description="`advisory` records decisions without applying them."
    )
    stable_window_seconds: int | None = Field(None, ge=10, le=3600)
    panic_window_seconds: int | None = Field(None, ge=5, le=600)
    panic_threshold: float | None = Field(
        None, ge=1.0, le=10.0, description="Load over capacity that triggers the panic window."
    )
    tolerance: float | None = Field(
        None, ge=0.0, le=0.9, description="Relative band around the SLO target with no action."
    )
    scale_up_cooldown_seconds: int | None = Field(None, ge=0, le=3600)
    scale_down_cooldown_seconds: int | None = Field(None, ge=0, le=86_400)
    max_scale_up_rate: float | None = Field(
        None, ge=1.0, le=100.0, description="At most this factor more replicas per decision."
    )
    max_scale_down_rate: float | None = Field(
        None, ge=1.0, le=100.0, description="At most this factor fewer replicas per decision."
    )
    target_utilization: float | None = Field(
        None,
        ge=0.1,
        le=1.0,
        description="Share of a replica's throughput at the SLO that the capacity model plans "
        "to use; the rest absorbs bursts before the next decision.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> ScalingSpec:
        low, high = self.min_replicas, self.max_replicas
        if low is not None and high is not None and low > high:
            raise ValueError(f"minReplicas ({low}) is greater than maxReplicas ({high})")
        return self


class CanarySpec(_Model):
    # isSorted() is Kubernetes' CEL list library (1.24+); strictness by distinct elements.
    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                # Unset steps take the default (which pydantic fills, the API server does not).
                "!has(self.steps) || self.steps.isSorted() "
                "&& self.steps.all(s, self.steps.exists_one(t, t == s))",
                "spec.rollout.canary.steps: weights must increase from step to step",
            )
        )
    )

    steps: list[Annotated[int, Field(ge=1, le=100)]] = Field(
        default_factory=lambda: [5, 25, 50, 100],
        min_length=1,
        max_length=20,
        description="Traffic weights (percent) the canary walks through.",
    )
    step_seconds: int = Field(300, ge=10, le=86_400, description="Analysis time per step.")
    max_ttft_regression: float = Field(
        0.2, ge=0.0, le=10.0, description="Allowed relative TTFT p95 increase over stable."
    )
    max_tpot_regression: float = Field(0.2, ge=0.0, le=10.0)
    max_error_rate_increase: float = Field(0.01, ge=0.0, le=1.0)

    @field_validator("steps")
    @classmethod
    def _increasing(cls, steps: list[int]) -> list[int]:
        if any(a >= b for a, b in itertools.pairwise(steps)):
            raise ValueError(f"weights must increase from step to step, got {steps}")
        return steps


class ShadowSpec(_Model):
    model: ModelSpec | None = Field(None, description="Model of the shadow (default: primary's).")
    image: str | None = Field(None, max_length=1024, pattern=IMAGE_PATTERN)
    engine: EngineSpec | None = None
    quantization: Quantization | None = Field(
        None, description="Quantization of the shadow (default: primary's)."
    )
    replicas: int = Field(1, ge=1, le=100, description="Shadow engine replicas (not autoscaled).")
    mirror_percent: float = Field(10.0, ge=0.0, le=100.0)
    max_rps: float | None = Field(None, ge=0.0, description="Cap on mirrored requests per second.")


class RolloutSpec(_Model):
    canary: CanarySpec | None = Field(
        None,
        description=(
            "Set: a change of model or engine settings starts a canary revision beside the "
            "stable one, stepped through `steps` and promoted or rolled back on SLO metrics. "
            "Unset: the engines are updated in place (rolling update)."
        ),
    )
    shadow: ShadowSpec | None = Field(
        None, description="A shadow revision that gets a sampled copy of the traffic."
    )


class RouterSpec(_Model):
    replicas: int = Field(1, ge=1, le=100, description="Router replicas.")
    api_key_secret: str | None = Field(
        None,
        pattern=DNS_LABEL,
        max_length=253,
        description="Secret whose `api-key` entry clients must send as a Bearer token.",
    )
    prefix_chars: int | None = Field(
        None, ge=0, le=100_000, description="Prompt prefix (characters) hashed for KV affinity."
    )


class BatchStorage(_Model):
    claim_name: str | None = Field(
        None,
        pattern=DNS_LABEL,
        max_length=253,
        description="PersistentVolumeClaim the router keeps batch files, records and results in "
        "(ReadWriteMany with more than one router). Without it an emptyDir: kept across router "
        "restarts, lost with the pod.",
    )


class BatchSpec(_Model):
    enabled: bool = Field(
        False, description="Serve OpenAI's Batch API (/v1/files, /v1/batches) on the router."
    )
    storage: BatchStorage | None = Field(None, description="Where batches are kept.")
    max_file_bytes: int | None = Field(
        None, ge=1, le=2**31, description="Largest batch file accepted (default 100 MiB)."
    )
    max_concurrent_requests: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Batch requests sent to the engines at once, over all batches (default 16).",
    )


class DraftModelSource(ModelSource):
    where: ClassVar[str] = "spec.speculative.draftModel.source"
    model_config = ConfigDict(json_schema_extra=_source_schema(where))


class DraftModelSpec(_Model):
    source: DraftModelSource = Field(
        description="Where the draft's weights come from, as spec.model.source: a `uri` is "
        "downloaded by the same init container kind before the engine starts. It must share the "
        "served model's tokenizer (the engine checks at start; a mismatch is Degraded)."
    )


# The engine's speculative methods (kvpilot_engine.spec_decode.config.METHODS; a test keeps the
# two lists equal).
SPECULATIVE_METHODS = ("ngram", "suffix", "draft_model")


class SpeculativeSpec(_Model):
    """`kvpilot serve --speculative-config`, with vLLM's keys in camelCase."""

    # Rules on one side of a policy merge only; check_servable checks the merged spec.
    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!has(self.promptLookupMin) || !has(self.promptLookupMax) "
                "|| self.promptLookupMin <= self.promptLookupMax",
                "spec.speculative.promptLookupMin must not be greater than "
                "spec.speculative.promptLookupMax",
            ),
            (
                "!has(self.draftModel) || !has(self.method) || self.method == 'draft_model'",
                "spec.speculative.draftModel goes with method draft_model",
            ),
        )
    )

    enabled: bool | None = Field(
        None, description="Off with `false` (e.g. to opt out of a policy's); on when unset."
    )
    method: Literal[SPECULATIVE_METHODS] | None = Field(  # type: ignore[valid-type]
        None,
        description="`ngram`: prompt lookup in the request's own tokens (code editing, document "
        "QA); `suffix`: also recent requests' outputs; `draft_model`: a smaller model of the "
        "same tokenizer (draftModel). Default ngram.",
    )
    num_speculative_tokens: int | None = Field(
        None, ge=1, le=32, description="Most drafts a sequence verifies per step (default 5)."
    )
    prompt_lookup_min: int | None = Field(
        None, ge=1, le=64, description="ngram/suffix: shortest suffix looked up (default 2)."
    )
    prompt_lookup_max: int | None = Field(
        None, ge=1, le=64, description="ngram/suffix: longest suffix looked up (default 4)."
    )
    suffix_cache_requests: int | None = Field(
        None,
        ge=0,
        le=100_000,
        description="suffix: finished requests' outputs kept for lookups (default 64).",
    )
    disable_by_batch_size: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="No drafts in a step with more decoding sequences than this.",
    )
    adaptive: bool | None = Field(
        None,
        description="Per step and request, verify only the drafts the engine's cost model "
        "expects to pay (default true).",
    )
    draft_model: DraftModelSpec | None = Field(
        None, description="The draft model (method draft_model only, and required by it)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> SpeculativeSpec:
        low, high = self.prompt_lookup_min, self.prompt_lookup_max
        if low is not None and high is not None and low > high:
            raise ValueError(
                f"spec.speculative.promptLookupMin ({low}) is greater than "
                f"spec.speculative.promptLookupMax ({high})"
            )
        if self.draft_model is not None and self.method not in (None, "draft_model"):
            raise ValueError(
                f"spec.speculative.draftModel goes with method draft_model, not {self.method}"
            )
        return self


class AdapterSource(ModelSource):
    """A LoRA adapter's source: a model source's kinds (a `uri` is downloaded into the model's
    cache by an init container of its own, with its own credentials), without a cache of its
    own (it shares the model's)."""

    where: ClassVar[str] = "spec.adapters[].source"
    model_config = ConfigDict(
        json_schema_extra=_source_schema(where)
        | {
            "x-kubernetes-validations": _source_schema(where)["x-kubernetes-validations"]
            + cel(
                (
                    "!has(self.cache)",
                    f"{where}.cache: adapters are downloaded into the model's cache "
                    "(spec.model.source.cache)",
                )
            )["x-kubernetes-validations"]
        }
    )

    @model_validator(mode="after")
    def _no_cache(self) -> AdapterSource:
        if self.cache is not None:
            raise ValueError(
                f"{self.where}.cache: adapters are downloaded into the model's cache "
                "(spec.model.source.cache)"
            )
        return self


class AdapterCanarySpec(CanarySpec):
    """A new version of an adapter, served beside the current one on the same engines."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                # Unset steps take the default (which pydantic fills, the API server does not).
                "!has(self.steps) || self.steps.isSorted() "
                "&& self.steps.all(s, self.steps.exists_one(t, t == s))",
                "spec.adapters[].canary.steps: weights must increase from step to step",
            )
        )
    )

    source: AdapterSource = Field(
        description="The new version. Loaded on every engine beside the current one; `steps` "
        "are shares of this adapter's requests."
    )


class AdapterShadowSpec(_Model):
    source: AdapterSource = Field(
        description="A candidate version that gets a copy of a sample of this adapter's requests "
        "(answers compared, never returned)."
    )
    mirror_percent: float = Field(10.0, ge=0.0, le=100.0)
    max_rps: float | None = Field(None, ge=0.0, description="Cap on mirrored requests per second.")


class AdapterSpec(_Model):
    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!has(self.canary) || self.canary.source != self.source",
                "spec.adapters[].canary.source: the same as source; nothing to roll out",
            )
        )
    )

    # Init containers are named after it (`adapter-<name>-canary`, at most 63 characters).
    name: str = Field(
        min_length=1,
        max_length=48,
        pattern=DNS_LABEL,
        description="The adapter's name in this service (a DNS label).",
    )
    source: AdapterSource = Field(
        description="A PEFT adapter folder (adapter_config.json + adapter_model.safetensors), "
        "as spec.model.source: `uri` (downloaded), `path` in the engine image, or `pvc`."
    )
    served_name: str | None = Field(
        None,
        min_length=1,
        max_length=253,
        pattern=r"^[^@\s]+$",
        description="Name clients send as `model` (default: `name`).",
    )
    canary: AdapterCanarySpec | None = Field(
        None,
        description="Roll a new version out: the router gives it `steps` of this adapter's "
        "requests and the operator promotes or rolls it back on TTFT, TPOT and errors against "
        "the current version, as spec.rollout.canary does for the model.",
    )
    shadow: AdapterShadowSpec | None = Field(None, description="Mirror traffic to a candidate.")

    @model_validator(mode="after")
    def _new_canary(self) -> AdapterSpec:
        if self.canary is not None and self.canary.source == self.source:
            raise ValueError(
                "spec.adapters[].canary.source: the same as source; nothing to roll out"
            )
        return self

    @property
    def served(self) -> str:
        return self.served_name or self.name


def _served(var: str) -> str:
    return f"(has({var}.servedName) ? {var}.servedName : {var}.name)"


def _check_adapters(adapters: list[AdapterSpec] | None) -> list[AdapterSpec] | None:
    names = [a.name for a in adapters or []]
    served = [a.served for a in adapters or []]
    for what, values in (("name", names), ("servedName", served)):
        dups = sorted({v for v in values if values.count(v) > 1})
        if dups:
            raise ValueError(f"adapter {what}s must be unique, repeated: {', '.join(dups)}")
    return adapters


class LLMServiceSpec(_Model):
    """An OpenAI-compatible LLM endpoint held to TTFT/TPOT SLOs, served by kvpilot engines."""

    # Cross-field rules of the service's own fields; what a policy adds is checked after the
    # merge by the operator (controller.manifests.check_servable), which also covers these.
    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "self.parallelism.tensor == 1 || self.resources.gpu.count == 0 "
                "|| self.parallelism.tensor == self.resources.gpu.count",
                "spec.parallelism.tensor must equal spec.resources.gpu.count: one GPU per "
                "tensor-parallel rank",
            ),
            (
                "!has(self.quantization) || self.quantization != 'fp8' "
                "|| self.resources.gpu.count > 0",
                "spec.quantization: fp8 needs a Hopper GPU (spec.resources.gpu.count)",
            ),
            (
                "!has(self.adapters) || !has(self.model.servedName) "
                f"|| self.adapters.all(a, {_served('a')} != self.model.servedName)",
                "spec.adapters: an adapter's served name is the model's (spec.model.servedName)",
            ),
        )
    )

    model: ModelSpec = Field(description="The model to serve.")
    policy: str | None = Field(
        None, pattern=DNS_LABEL, max_length=63, description="A ServingPolicy's name."
    )
    replicas: int | None = Field(
        None,
        ge=0,
        le=1000,
        description="Desired engine replicas; written by the autoscaler (scale subresource).",
    )
    slo: SLOSpec | None = Field(None, description="Latency objectives (the autoscaler's target).")
    quantization: Quantization | None = Field(
        None, description="Weight quantization (`gguf`: keep a GGUF file's quantized tensors)."
    )
    # `default: {}` lets the API server fill the nested defaults even when the block is absent.
    parallelism: ParallelismSpec = Field(
        default_factory=ParallelismSpec,
        json_schema_extra={"default": {}},
        description="Sharding of one replica over GPUs.",
    )
    engine: EngineSpec | None = Field(None, description="Engine knobs (`kvpilot serve` flags).")
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec,
        json_schema_extra={"default": {}},
        description="What one replica asks the scheduler for.",
    )
    scaling: ScalingSpec | None = Field(None, description="Replica bounds and autoscaler tuning.")
    rollout: RolloutSpec | None = Field(None, description="Canary and shadow rollouts.")
    router: RouterSpec = Field(
        default_factory=RouterSpec,
        json_schema_extra={"default": {}},
        description="The OpenAI-compatible router in front of the engines.",
    )
    batch: BatchSpec | None = Field(
        None, description="OpenAI's Batch API on the router, run at low priority."
    )
    speculative: SpeculativeSpec | None = Field(
        None,
        description="Speculative decoding: cheap drafts verified in the engine's normal step, "
        "the same output; faster at 1-4 requests in flight where drafts are accepted.",
    )
    adapters: Annotated[list[AdapterSpec] | None, AfterValidator(_check_adapters)] = Field(
        None,
        max_length=256,
        description="LoRA adapters of the model, served by the same engines and mixed in one "
        "batch; clients pick one by its served name in `model`. Sized by spec.engine.maxLoras, "
        "maxLoraRank and maxCpuLoras.",
        json_schema_extra=cel(
            (
                "self.all(a, self.exists_one(b, b.name == a.name))",
                "spec.adapters: adapter names must be unique",
            ),
            (
                f"self.all(a, self.exists_one(b, {_served('b')} == {_served('a')}))",
                "spec.adapters: adapter servedNames must be unique",
            ),
        ),
    )
    image: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        pattern=IMAGE_PATTERN,
        description="Engine image (default: operator's).",
    )


# --- status -----------------------------------------------------------------------------------


class Condition(_Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class ScalingDecision(_Model):
    time: str
    from_replicas: int = Field(alias="from")
    to_replicas: int = Field(alias="to")
    reason: str
    applied: bool = True


class CanaryAnalysis(_Model):
    """One step's comparison, from the routers' client-side metrics."""

    canary_requests: int = 0
    stable_requests: int = 0
    canary_ttft_p95_ms: float | None = None
    stable_ttft_p95_ms: float | None = None
    canary_tpot_p95_ms: float | None = None
    stable_tpot_p95_ms: float | None = None
    canary_error_rate: float | None = None
    stable_error_rate: float | None = None


class CanaryStatus(_Model):
    revision: str = Field(description="The canary's revision (hash of its engine settings).")
    stable_revision: str
    phase: Literal["Progressing", "Promoting", "Promoted", "RolledBack"]
    step: int = Field(description="Index into spec.rollout.canary.steps.")
    weight: int = Field(description="Percent of traffic the canary gets now.")
    step_started_at: str
    verdict: Literal["Pending", "Pass", "Fail", "Inconclusive"] = "Pending"
    reasons: list[str] | None = None
    analysis: CanaryAnalysis | None = None


class ShadowStatus(_Model):
    revision: str
    mirrored: int = Field(0, description="Requests copied to the shadow (status window).")
    errors: int = 0
    compared: int = 0
    greedy_compared: int = 0
    greedy_agreement: float | None = Field(None, description="Share of identical greedy outputs.")
    mean_overlap: float | None = Field(None, description="Mean token-overlap F1, sampled requests.")
    e2e_delta_p50_ms: float | None = Field(None, description="Shadow minus primary latency, p50.")
    ttft_delta_p50_ms: float | None = None


class SourceStatus(_Model):
    uri: str | None = Field(None, description="spec.model.source.uri, as downloaded.")
    revision: str | None = Field(
        None,
        description="What the engine pods' downloads resolved the URI to (a Hub commit, an S3 "
        "listing hash), when they agree.",
    )
    revisions: list[str] | None = Field(
        None,
        description="Every revision, when the pods' downloads resolved to different ones.",
    )
    downloading: int | None = Field(None, description="Engine pods downloading now.")


class AdapterStatus(_Model):
    name: str = Field(description="spec.adapters[].name.")
    canary: CanaryStatus | None = Field(
        None,
        description="The adapter's canary: `revision` and `stableRevision` are the two "
        "versions' folders on the engines (one per source).",
    )
    shadow: ShadowStatus | None = None


class BatchesStatus(_Model):
    """The Batch API's progress on the service, from its routers' `kvpilot_batch_*` metrics."""

    active: int = Field(0, description="Batches validating, in progress, finalizing or cancelling.")
    by_status: dict[str, int] | None = Field(
        None, description="Batches by status (`in_progress`, `completed`, `expired`, ...)."
    )
    requests_total: int = Field(0, description="Requests in the active batches.")
    requests_completed: int = Field(0, description="Of those, answered.")
    requests_failed: int = Field(0, description="Of those, failed (refused or expired).")
    finish_rate: float | None = Field(
        None, description="Batch requests answered per second over the last five minutes."
    )
    nearest_deadline: str | None = Field(
        None, description="When the nearest active batch's completion window closes."
    )
    deadline_at_risk: bool | None = Field(
        None,
        description="At finishRate the unanswered requests would not be done by nearestDeadline "
        "(unset: no deadline, or no rate measured yet).",
    )


class LLMServiceStatus(_Model):
    observed_generation: int | None = None
    # A list-map keyed by type (Kubernetes' convention): server-side apply merges by type.
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )
    replicas: int | None = None
    ready_replicas: int | None = None
    selector: str | None = Field(None, description="Label selector of the engine pods (scale).")
    endpoint: str | None = Field(None, description="OpenAI base URL inside the cluster.")
    model: str | None = Field(None, description="Served model name.")
    ttft_p95_ms: float | None = None
    tpot_p95_ms: float | None = None
    slo_met: str | None = Field(None, description="`True`, `False` or `Unknown`.")
    last_decisions: list[ScalingDecision] | None = None
    stable_revision: str | None = Field(None, description="Revision serving the stable traffic.")
    canary: CanaryStatus | None = None
    shadow: ShadowStatus | None = None
    source: SourceStatus | None = Field(None, description="The downloaded model's revision.")
    batches: BatchesStatus | None = Field(None, description="Batch API progress (spec.batch).")
    adapters: list[AdapterStatus] | None = Field(
        None,
        description="Adapter rollouts (spec.adapters[].canary and .shadow).",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
        },
    )


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=DNS_LABEL, max_length=63)
    namespace: str | None = None
    generation: int | None = None
    uid: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class ServiceMeta(ObjectMeta):
    name: str = Field(pattern=DNS_1035_LABEL, max_length=63)


class LLMService(_Model):
    api_version: Literal["kvpilot.io/v1alpha1"] = API_VERSION
    kind: Literal["LLMService"] = "LLMService"
    metadata: ServiceMeta
    spec: LLMServiceSpec
    status: LLMServiceStatus | None = None


# --- ServingPolicy ----------------------------------------------------------------------------


class PolicyLimits(_Model):
    """What the services that name a policy may ask for: a platform team's guard rails, checked
    by the operator (Degraded=NotAllowed, nothing applied) whatever the service's own fields say."""

    images: list[Annotated[str, Field(min_length=1, max_length=1024)]] | None = Field(
        None,
        max_length=64,
        description="Engine image prefixes a service may set in `image` or a shadow's "
        "(e.g. `registry.corp/kvpilot/`); unset: any image.",
    )
    extra_args: list[Annotated[str, Field(pattern=r"^--[a-z0-9-]+$")]] | None = Field(
        None,
        max_length=256,
        description="`kvpilot serve` flags a service may pass in `engine.extraArgs` (e.g. "
        "`--seed`); unset: any flag, empty: none.",
    )
    max_adapters: int | None = Field(
        None,
        ge=0,
        le=256,
        description="Most LoRA adapters a service may declare in `adapters`; unset: any.",
    )


class ServingPolicySpec(_Model):
    """Cluster-wide serving presets that an LLMService names in spec.policy."""

    description: str | None = None
    slo: SLOSpec | None = None
    quantization: Quantization | None = None
    engine: EngineSpec | None = None
    scaling: ScalingSpec | None = None
    batch: BatchSpec | None = None
    speculative: SpeculativeSpec | None = None
    limits: PolicyLimits | None = Field(
        None, description="What services naming this policy may use (not a preset: not merged)."
    )


class ServingPolicy(_Model):
    api_version: Literal["kvpilot.io/v1alpha1"] = API_VERSION
    kind: Literal["ServingPolicy"] = "ServingPolicy"
    metadata: ObjectMeta
    spec: ServingPolicySpec
