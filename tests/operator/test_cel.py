"""The CRDs' CEL rules (`x-kubernetes-validations`, run by 1.25+ API servers), evaluated with
cel-python against the same specs as the pydantic validators they restate: every valid spec we
ship passes every rule, every broken one a rule catches is caught with a message naming the
same field, and the cross-field mistakes are all caught. The local 1.20 API server cannot run
CEL, so this is where the rules are tested."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml
from kvpilot_operator.api.crds import llmservice_crd

from tests.support.invalid_specs import CASES, case_doc

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = llmservice_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

# Mistakes only a cross-field rule can catch: on 1.25+ each is refused at `kubectl apply`.
CAUGHT_BY_CEL = {
    "absolute pvc path", "pvc path escapes", "fp8 without gpu", "pipeline", "tensor vs gpus",
    "extra --port", "extra --host=", "extra --model", "extra duplicates a field",
    "toleration Exists with a value", "toleration seconds without NoExecute", "min over max",
    "canary steps decrease", "canary steps repeat", "uri and path", "secret without uri",
    "prompt lookup min over max", "draft model with ngram", "draft uri and path",
    "extra --speculative-config",
    "adapter names repeat", "adapter served names repeat", "adapter named as the model",
    "adapter with its own cache", "adapter canary of the same source",
    "adapter canary steps decrease", "cpu loras under max loras", "extra --lora-modules",
}  # fmt: skip


def _is_sorted(items: Any) -> celpy.celtypes.BoolType:
    """Kubernetes' CEL list library's isSorted()."""
    values = list(items)
    return celpy.celtypes.BoolType(all(a <= b for a, b in itertools.pairwise(values)))


ENV = celpy.Environment()
_programs: dict[str, Any] = {}


def _program(rule: str) -> Any:
    if rule not in _programs:
        _programs[rule] = ENV.program(ENV.compile(rule), functions={"isSorted": _is_sorted})
    return _programs[rule]


def defaulted(schema: dict[str, Any], obj: Any) -> Any:
    """The object as the API server stores it: schema defaults filled in before CEL runs."""
    if isinstance(obj, dict) and "properties" in schema:
        out = dict(obj)
        for key, sub in schema["properties"].items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
            if key in out:
                out[key] = defaulted(sub, out[key])
        return out
    if isinstance(obj, list) and "items" in schema:
        return [defaulted(schema["items"], v) for v in obj]
    return obj


def violations(schema: dict[str, Any], obj: Any, path: str = "") -> list[tuple[str, str]]:
    """(path, message) of every rule `obj` breaks, walking the schema as the API server does."""
    found = []
    for rule in schema.get("x-kubernetes-validations", []):
        result = _program(rule["rule"]).evaluate({"self": celpy.json_to_cel(obj)})
        assert isinstance(result, celpy.celtypes.BoolType), (rule, result)  # not an eval error
        if not result:
            found.append((path, rule["message"]))
    if isinstance(obj, dict):
        for key, value in obj.items():
            sub = (schema.get("properties") or {}).get(key) or schema.get("additionalProperties")
            if isinstance(sub, dict):
                found += violations(sub, value, f"{path}.{key}".lstrip("."))
    elif isinstance(obj, list) and "items" in schema:
        for i, value in enumerate(obj):
            found += violations(schema["items"], value, f"{path}[{i}]")
    return found


def _check(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return violations(SCHEMA, defaulted(SCHEMA, doc))


def test_the_crd_carries_rules() -> None:
    rules = []

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            rules.extend(node.get("x-kubernetes-validations", []))
            for value in node.values():
                collect(value)

    collect(SCHEMA)
    assert len(rules) >= 10
    for rule in rules:  # each compiles, and says which field it is about
        _program(rule["rule"])
        assert rule["message"].startswith("spec."), rule


def _shipped_services() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((ROOT / "docs" / "examples").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "LLMService"]
    return docs


def test_valid_specs_pass_every_rule() -> None:
    docs = _shipped_services()
    assert docs
    canary = {"canary": {"steps": [5, 25, 50, 100]}, "shadow": {"image": "kvpilot/engine:0.2"}}
    docs += [
        case_doc(0, {}),
        case_doc(1, {"rollout": canary, "scaling": {"minReplicas": 2, "maxReplicas": 2}}),
        case_doc(
            2,
            {
                "parallelism": {"tensor": 2},
                "resources": {"gpu": {"count": 2}},
                "quantization": "fp8",
            },
        ),
        case_doc(
            3,
            {
                "model": {"source": {"pvc": {"claimName": "w"}, "path": "llama/8b"}},
                "engine": {"extraArgs": ["--seed", "4", "--hosted=x"]},
            },
        ),
        case_doc(
            4,
            {
                "resources": {
                    "tolerations": [
                        {"operator": "Exists"},
                        {"key": "gpu", "effect": "NoExecute", "tolerationSeconds": 5},
                    ]
                }
            },
        ),
    ]
    for doc in docs:
        assert _check(doc) == [], doc["metadata"]["name"]


@pytest.mark.parametrize(("label", "fields", "field"), CASES, ids=[c[0] for c in CASES])
def test_rules_agree_with_the_models(label: str, fields: dict[str, Any], field: str) -> None:
    found = _check(case_doc(0, fields))
    assert all(field in message for _, message in found), found
    assert bool(found) == (label in CAUGHT_BY_CEL), (label, found)
