"""Resolve an LLMService's effective spec: built-in defaults < its ServingPolicy < its own fields.

Pure functions over the pydantic models (the policy is fetched by a function the caller passes).
The reconcile and the autoscaler call `resolve`, and `kvpilot render` calls `resolve_spec` over
the presets, so all of them agree on what a service means; the rollout controller, which reads
only spec.rollout (no policy sets it), shares `parse`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kvpilot_operator.api.types import (
    LLMService,
    LLMServiceSpec,
    PolicyLimits,
    ServingPolicy,
    ServingPolicySpec,
)
from kvpilot_operator.packaged import packaged

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

POLICIES_DIR = packaged("policies")


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
    policy_fields.pop("limits", None)  # checked against the service (`check_limits`), not merged
    merged = deep_merge(deep_merge(BUILTIN_DEFAULTS, policy_fields), _wire(spec))
    return LLMServiceSpec.model_validate(merged)


def load_presets(directory: Path = POLICIES_DIR) -> dict[str, ServingPolicy]:
    """The ServingPolicy presets shipped in `policies/`, by name."""
    presets = {}
    for path in sorted(directory.glob("*.yaml")):
        policy = ServingPolicy.model_validate(yaml.safe_load(path.read_text()))
        presets[policy.metadata.name] = policy
    return presets


def validation_message(err: ValidationError, prefix: str) -> str:
    """The first error of `err` with its field path (`spec.x.y: ...`), list indices in brackets."""
    first = err.errors()[0]
    where = prefix
    for part in first["loc"]:
        where += f"[{part}]" if isinstance(part, int) else f".{part}"
    where = where.lstrip(".")
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    message = first["msg"].removeprefix("Value error, ")
    return f"{where}: {message}{more}"


def parse(body: dict[str, Any]) -> LLMService:
    """An LLMService object as the API server returns it (status is not the spec's business)."""
    return LLMService.model_validate({k: v for k, v in body.items() if k != "status"})


class Unresolved(Exception):
    """Why a body has no effective spec; `reason` is the status condition's reason."""

    def __init__(self, reason: str, message: str, service: LLMService | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.service = service


def resolve(
    body: dict[str, Any], get_policy: Callable[[str], dict[str, Any] | None]
) -> tuple[LLMService, LLMServiceSpec]:
    """An LLMService body -> (the service, its effective spec), fetching the ServingPolicy it
    names with `get_policy` (a policy body, or None when there is none). Raises `Unresolved`
    (InvalidSpec, PolicyNotFound, InvalidPolicy or NotAllowed: the policy's limits) with a
    message that names the field."""
    try:
        svc = parse(body)
    except ValidationError as err:
        raise Unresolved("InvalidSpec", validation_message(err, "")) from err
    policy = None
    if svc.spec.policy:
        policy_body = get_policy(svc.spec.policy)
        if policy_body is None:
            message = (
                f"spec.policy: ServingPolicy {svc.spec.policy!r} does not exist "
                "(create it, or name another with `kubectl get servingpolicies`)"
            )
            raise Unresolved("PolicyNotFound", message, svc)
        try:
            policy = ServingPolicy.model_validate(
                {k: v for k, v in policy_body.items() if k != "status"}
            ).spec
        except ValidationError as err:
            where = f"spec.policy: ServingPolicy {svc.spec.policy}: spec"
            raise Unresolved("InvalidPolicy", validation_message(err, where), svc) from err
    try:
        spec = resolve_spec(svc.spec, policy)
    except ValidationError as err:
        # The service's fields merged over its policy's: a rule across both (min/max replicas).
        message = validation_message(err, "spec")
        if policy is not None:
            message += f" (with ServingPolicy {svc.spec.policy}'s values)"
        raise Unresolved("InvalidSpec", message, svc) from err
    if policy is not None and policy.limits is not None:
        refused = check_limits(spec, policy.limits)
        if refused is not None:
            raise Unresolved("NotAllowed", f"{refused}, in ServingPolicy {svc.spec.policy}", svc)
    return svc, spec


def check_limits(spec: LLMServiceSpec, limits: PolicyLimits) -> str | None:
    """What in `spec` its policy's limits do not allow (naming the field), or None."""
    shadow = spec.rollout.shadow if spec.rollout else None
    images = [("spec.image", spec.image)]
    args = [("spec.engine.extraArgs", spec.engine.extra_args if spec.engine else None)]
    if shadow is not None:
        images.append(("spec.rollout.shadow.image", shadow.image))
        args.append(
            (
                "spec.rollout.shadow.engine.extraArgs",
                shadow.engine.extra_args if shadow.engine else None,
            )
        )
    if limits.images is not None:
        for field, image in images:
            if image is not None and not any(image.startswith(p) for p in limits.images):
                return f"{field}: {image!r} is not an allowed image (limits.images)"
    adapters = len(spec.adapters or [])
    if limits.max_adapters is not None and adapters > limits.max_adapters:
        return (
            f"spec.adapters: {adapters} adapters, more than the {limits.max_adapters} allowed "
            "(limits.maxAdapters)"
        )
    if limits.extra_args is not None:
        for field, given in args:
            for arg in given or []:
                flag = arg.split("=", 1)[0]
                if flag.startswith("-") and flag not in limits.extra_args:
                    return f"{field}: {flag} is not an allowed flag (limits.extraArgs)"
    return None
