"""Resolve an LLMService's effective spec: built-in defaults < its ServingPolicy < its own fields.

Pure functions over the pydantic models; the operator, `kvpilot render` and the autoscaler all
call `resolve_spec`, so the three always agree on what a service means.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kvpilot_operator.api import LLMServiceSpec, ServingPolicy, ServingPolicySpec

# What a service gets when neither it nor its policy says otherwise. Engine knobs are left to the
# engine's own defaults (so `kvpilot serve` and the operator cannot drift apart).
BUILTIN_DEFAULTS: dict[str, Any] = {
    "quantization": "none",
    "slo": {
        "ttft": {"percentile": 95, "targetMs": 1000},
        "tpot": {"percentile": 95, "targetMs": 100},
        "window": "5m",
    },
    "scaling": {
        "minReplicas": 1,
        "maxReplicas": 4,
        "scaleToZero": False,
        "idleSeconds": 600,
        "mode": "active",
        "stableWindowSeconds": 120,
        "panicWindowSeconds": 15,
        "panicThreshold": 2.0,
        "tolerance": 0.1,
        "scaleUpCooldownSeconds": 30,
        "scaleDownCooldownSeconds": 300,
        "maxScaleUpRate": 4.0,
        "maxScaleDownRate": 2.0,
        "targetUtilization": 0.8,
    },
}

POLICIES_DIR = Path(__file__).resolve().parents[2] / "policies"


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` wins key by key; nested mappings merge, lists and scalars replace."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _wire(model: LLMServiceSpec | ServingPolicySpec) -> dict[str, Any]:
    return model.model_dump(by_alias=True, exclude_none=True, mode="json")


def resolve_spec(spec: LLMServiceSpec, policy: ServingPolicySpec | None) -> LLMServiceSpec:
    policy_fields = _wire(policy) if policy is not None else {}
    policy_fields.pop("description", None)
    merged = deep_merge(deep_merge(BUILTIN_DEFAULTS, policy_fields), _wire(spec))
    return LLMServiceSpec.model_validate(merged)


def load_presets(directory: Path = POLICIES_DIR) -> dict[str, ServingPolicy]:
    """The ServingPolicy presets shipped in `policies/`, by name."""
    presets = {}
    for path in sorted(directory.glob("*.yaml")):
        policy = ServingPolicy.model_validate(yaml.safe_load(path.read_text()))
        presets[policy.metadata.name] = policy
    return presets
