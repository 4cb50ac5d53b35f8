"""Broken LLMServices, one mistake each, across the whole API: what a user can write that kvpilot
must refuse, and the field the refusal must name.

Each case is refused either at `kubectl apply` (the CRD schema; on 1.25+ clusters also its CEL
rules) or by the operator (Degraded, naming the field, creating no engine Deployment). The
cluster suite (tests/operator/test_operator.py) applies them all; the CEL test
(tests/operator/test_cel.py) checks the rules and the pydantic validators agree on them.
"""

from __future__ import annotations

from typing import Any

# (label, the LLMService's fields over a valid minimal one, the field the refusal names)
CASES: list[tuple[str, dict[str, Any], str]] = [
    # --- names: the LLMService's name is also its Service's (DNS-1035, at most 63 characters)
    ("leading digit", {"metadata": {"name": "1chat"}}, "metadata.name"),
    ("dot in name", {"metadata": {"name": "chat.v2"}}, "metadata.name"),
    ("name too long", {"metadata": {"name": "c" + "x" * 63}}, "metadata.name"),
    # --- model
    ("no source", {"model": {"source": {}}}, "spec.model.source"),
    ("dtype", {"model": {"source": {"path": "m"}, "dtype": "int8"}}, "spec.model.dtype"),
    ("context", {"model": {"source": {"path": "m"}, "maxContext": 8}}, "spec.model.maxContext"),
    (
        "absolute pvc path",
        {"model": {"source": {"pvc": {"claimName": "weights"}, "path": "/models/llama"}}},
        "spec.model.source.path",
    ),
    (
        "pvc path escapes",
        {"model": {"source": {"pvc": {"claimName": "weights"}, "path": "a/../../etc"}}},
        "spec.model.source.path",
    ),
    ("empty claim", {"model": {"source": {"pvc": {"claimName": ""}}}}, "claimName"),
    ("unknown source scheme", {"model": {"source": {"uri": "gs://b/m"}}}, "spec.model.source.uri"),
    (
        "uri and path",
        {"model": {"source": {"uri": "s3://models/m", "path": "m"}}},
        "spec.model.source",
    ),
    (
        "secret without uri",
        {"model": {"source": {"path": "m", "secretName": "creds"}}},
        "spec.model.source",
    ),
    # --- policy
    ("policy name", {"policy": "Interactive_Chat"}, "spec.policy"),
    ("missing policy", {"policy": "no-such-policy"}, "spec.policy"),
    # --- quantization and parallelism
    ("quantization", {"quantization": "int3"}, "spec.quantization"),
    ("fp8 without gpu", {"quantization": "fp8"}, "spec.quantization"),
    (
        "gguf of a folder",
        {"quantization": "gguf", "model": {"source": {"path": "/m/hf"}}},
        "spec.quantization",
    ),
    ("tensor 0", {"parallelism": {"tensor": 0}}, "spec.parallelism.tensor"),
    ("pipeline", {"parallelism": {"pipeline": 2}}, "spec.parallelism.pipeline"),
    (
        "tensor vs gpus",
        {"parallelism": {"tensor": 2}, "resources": {"gpu": {"count": 4}}},
        "spec.parallelism.tensor",
    ),
    (
        "tensor past the model's heads",
        {"parallelism": {"tensor": 4}, "resources": {"gpu": {"count": 4}}},
        "spec.parallelism.tensor",
    ),
    # --- engine
    ("block size", {"engine": {"blockSize": 12}}, "spec.engine.blockSize"),
    ("kv memory", {"engine": {"kvCacheMemory": "lots"}}, "spec.engine.kvCacheMemory"),
    ("scheduling", {"engine": {"schedulingPolicy": "lifo"}}, "spec.engine.schedulingPolicy"),
    ("extra --port", {"engine": {"extraArgs": ["--port", "9000"]}}, "spec.engine.extraArgs"),
    ("extra --host=", {"engine": {"extraArgs": ["--host=10.0.0.1"]}}, "spec.engine.extraArgs"),
    ("extra --model", {"engine": {"extraArgs": ["--model", "other"]}}, "spec.engine.extraArgs"),
    (
        "extra duplicates a field",
        {"engine": {"extraArgs": ["--max-num-seqs", "8"]}},
        "spec.engine.extraArgs",
    ),
    # --- resources
    ("cpu not a quantity", {"resources": {"cpu": "two"}}, "spec.resources.cpu"),
    ("memory GB", {"resources": {"memory": "16GB"}}, "spec.resources.memory"),
    ("negative cpu", {"resources": {"cpu": "-1"}}, "spec.resources.cpu"),
    ("gpu count", {"resources": {"gpu": {"count": "two"}}}, "spec.resources.gpu.count"),
    (
        "gpu type",
        {"resources": {"gpu": {"count": 1, "type": "H100 SXM"}}},
        "spec.resources.gpu.type",
    ),
    (
        "node selector key",
        {"resources": {"nodeSelector": {"pool type": "gpu"}}},
        "spec.resources.nodeSelector",
    ),
    (
        "node selector value",
        {"resources": {"nodeSelector": {"pool": "a b"}}},
        "spec.resources.nodeSelector",
    ),
    (
        "toleration Exists with a value",
        {"resources": {"tolerations": [{"key": "gpu", "operator": "Exists", "value": "x"}]}},
        "spec.resources.tolerations",
    ),
    (
        "toleration seconds without NoExecute",
        {"resources": {"tolerations": [{"key": "gpu", "tolerationSeconds": 30}]}},
        "spec.resources.tolerations",
    ),
    ("image", {"image": "Registry/Kvpilot Engine:latest"}, "spec.image"),
    # --- scaling and SLOs
    ("negative replicas", {"replicas": -1}, "spec.replicas"),
    ("max replicas", {"scaling": {"maxReplicas": 0}}, "spec.scaling.maxReplicas"),
    ("min over max", {"scaling": {"minReplicas": 4, "maxReplicas": 2}}, "spec.scaling"),
    ("idle seconds", {"scaling": {"idleSeconds": 5}}, "spec.scaling.idleSeconds"),
    ("mode", {"scaling": {"mode": "auto"}}, "spec.scaling.mode"),
    (
        "percentile",
        {"slo": {"ttft": {"percentile": 97, "targetMs": 100}}},
        "spec.slo.ttft.percentile",
    ),
    ("no target", {"slo": {"tpot": {"percentile": 95}}}, "spec.slo.tpot.targetMs"),
    ("window", {"slo": {"window": "5 minutes"}}, "spec.slo.window"),
    # --- rollouts and router
    (
        "canary step over 100",
        {"rollout": {"canary": {"steps": [5, 150]}}},
        "spec.rollout.canary.steps",
    ),
    (
        "canary steps decrease",
        {"rollout": {"canary": {"steps": [50, 25, 100]}}},
        "spec.rollout.canary.steps",
    ),
    (
        "canary steps repeat",
        {"rollout": {"canary": {"steps": [25, 25, 100]}}},
        "spec.rollout.canary.steps",
    ),
    (
        "mirror percent",
        {"rollout": {"shadow": {"mirrorPercent": 150}}},
        "spec.rollout.shadow.mirrorPercent",
    ),
    (
        "shadow image",
        {"rollout": {"shadow": {"image": "not an image"}}},
        "spec.rollout.shadow.image",
    ),
    # --- speculative decoding
    (
        "speculative tokens",
        {"speculative": {"numSpeculativeTokens": 0}},
        "spec.speculative.numSpeculativeTokens",
    ),
    ("speculative method", {"speculative": {"method": "eagle"}}, "spec.speculative.method"),
    (
        "prompt lookup min over max",
        {"speculative": {"promptLookupMin": 5, "promptLookupMax": 3}},
        "spec.speculative.promptLookupMin",
    ),
    (
        "prompt lookup max under the default min",
        {"speculative": {"promptLookupMax": 1}},
        "spec.speculative",
    ),
    (
        "draft model with ngram",
        {"speculative": {"method": "ngram", "draftModel": {"source": {"path": "smollm2"}}}},
        "spec.speculative.draftModel",
    ),
    (
        "draft_model without a draft",
        {"speculative": {"method": "draft_model"}},
        "spec.speculative.draftModel",
    ),
    (
        "draft uri and path",
        {"speculative": {"draftModel": {"source": {"uri": "hf://org/m", "path": "m"}}}},
        "spec.speculative.draftModel.source",
    ),
    (
        "extra --speculative-config",
        {"engine": {"extraArgs": ["--speculative-config", "{}"]}},
        "spec.engine.extraArgs",
    ),
    ("api key secret", {"router": {"apiKeySecret": "My_Secret"}}, "spec.router.apiKeySecret"),
    ("router replicas", {"router": {"replicas": 0}}, "spec.router.replicas"),
    # --- LoRA adapters
    (
        "adapter name",
        {"adapters": [{"name": "SQL_v2", "source": {"path": "/a/sql"}}]},
        "spec.adapters",
    ),
    (
        "adapter names repeat",
        {
            "adapters": [
                {"name": "sql", "source": {"path": "/a/sql"}},
                {"name": "sql", "source": {"path": "/a/sql2"}},
            ]
        },
        "spec.adapters",
    ),
    (
        "adapter served names repeat",
        {
            "adapters": [
                {"name": "sql", "source": {"path": "/a/sql"}},
                {"name": "sql2", "servedName": "sql", "source": {"path": "/a/sql2"}},
            ]
        },
        "spec.adapters",
    ),
    (
        "adapter named as the model",
        {
            "model": {"source": {"path": "smollm2"}, "servedName": "chat"},
            "adapters": [{"name": "chat", "source": {"path": "/a/chat"}}],
        },
        "spec.adapters",
    ),
    (
        "adapter named as the service",
        {
            "metadata": {"name": "same-name"},
            "adapters": [{"name": "same-name", "source": {"path": "/a/x"}}],
        },
        "spec.adapters[0].servedName",
    ),
    ("adapter without source", {"adapters": [{"name": "sql"}]}, "spec.adapters"),
    (
        "adapter with its own cache",
        {
            "adapters": [
                {
                    "name": "sql",
                    "source": {"uri": "s3://adapters/sql", "cache": {"claimName": "c"}},
                }
            ]
        },
        "spec.adapters",
    ),
    (
        "adapter canary of the same source",
        {
            "adapters": [
                {
                    "name": "sql",
                    "source": {"path": "/a/sql"},
                    "canary": {"source": {"path": "/a/sql"}},
                }
            ]
        },
        "spec.adapters",
    ),
    (
        "adapter canary steps decrease",
        {
            "adapters": [
                {
                    "name": "sql",
                    "source": {"path": "/a/sql"},
                    "canary": {"source": {"path": "/a/sql2"}, "steps": [50, 10]},
                }
            ]
        },
        "spec.adapters",
    ),
    ("lora rank", {"engine": {"maxLoraRank": 1024}}, "spec.engine.maxLoraRank"),
    ("max loras", {"engine": {"maxLoras": 0}}, "spec.engine.maxLoras"),
    (
        "cpu loras under max loras",
        {"engine": {"maxLoras": 8, "maxCpuLoras": 4}},
        "spec.engine.maxCpuLoras",
    ),
    (
        "extra --lora-modules",
        {"engine": {"extraArgs": ["--lora-modules", "a=/x"]}},
        "spec.engine.extraArgs",
    ),
]


def case_doc(index: int, fields: dict[str, Any]) -> dict[str, Any]:
    """The case's LLMService: a valid minimal one (scaled to zero) with the case's fields."""
    fields = dict(fields)
    metadata = {"name": f"bad-{index}", **fields.pop("metadata", {})}
    spec = {"model": {"source": {"path": "smollm2"}}, "replicas": 0, **fields}
    return {"apiVersion": "kvpilot.io/v1alpha1", "kind": "LLMService", "metadata": metadata,
            "spec": spec}  # fmt: skip
