"""Generate the CustomResourceDefinitions from the pydantic models in `types.py`.

Kubernetes wants *structural* OpenAPI v3 schemas: every node typed, no `$ref`, no `null` type,
and `anyOf`/`oneOf` only for value checks. pydantic's JSON Schema is close; `structural()` closes
the gap (inline `$defs`, drop the `null` branch of optional fields, drop titles and `default:
null`, keep descriptions, enums, ranges, patterns, required fields and defaults).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from kvpilot_operator.api.types import (
    GROUP,
    VERSION,
    LLMServiceSpec,
    LLMServiceStatus,
    ObjectMeta,
    ServiceMeta,
    ServingPolicySpec,
)
from kvpilot_operator.packaged import packaged, source_tree

# Keys of JSON Schema that Kubernetes' OpenAPI v3 subset accepts and we carry over.
_KEEP = {
    "type",
    "properties",
    "required",
    "items",
    "enum",
    "description",
    "default",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "pattern",
    "format",
    "additionalProperties",
    "anyOf",
    "x-kubernetes-int-or-string",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
}


def structural(schema: dict[str, Any], defs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Turn one pydantic JSON-Schema node into a structural OpenAPI v3 node."""
    defs = schema.get("$defs", {}) if defs is None else defs
    node = copy.deepcopy(schema)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        node = {**copy.deepcopy(target), **node}
    if "anyOf" in node and any(b.get("type") == "null" for b in node["anyOf"]):
        # Optional[X]: absence is null in Kubernetes; keep X's schema, the outer description.
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        inner = structural(branches[0], defs) if len(branches) == 1 else {"anyOf": branches}
        node = {**inner, **{k: v for k, v in node.items() if k != "default" or v is not None}}
    if node.get("x-kubernetes-int-or-string"):
        # int | str: Kubernetes applies a pattern to the string form only.
        keep = {"description", "x-kubernetes-int-or-string", "pattern"}
        return {k: v for k, v in node.items() if k in keep}
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "enum" in node and "type" not in node:
        node["type"] = _json_type(node["enum"][0])
    if node.get("default", 0) is None:
        del node["default"]
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key not in _KEEP or (key == "additionalProperties" and isinstance(value, bool)):
            # `additionalProperties: false` is not structural; the API server prunes unknown
            # fields and kubectl's schema validation rejects them.
            continue
        if key == "properties":
            out[key] = {name: structural(sub, defs) for name, sub in value.items()}
        elif key == "items" or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = structural(value, defs)
        elif key == "anyOf":
            # Only value checks (e.g. required-one-of) survive; typed unions were resolved above.
            out[key] = [{k: v for k, v in b.items() if k == "required"} for b in value]
        else:
            out[key] = value
    if "properties" in out:
        out.setdefault("type", "object")
    return out


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string"


def _without_defaults(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_defaults(v) for k, v in node.items() if k != "default"}
    if isinstance(node, list):
        return [_without_defaults(v) for v in node]
    return node


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    return structural(model.model_json_schema(by_alias=True, mode="validation"))


def _crd(
    kind: str,
    plural: str,
    scope: str,
    meta_model: type[BaseModel],
    spec_model: type[BaseModel],
    status_model: type[BaseModel] | None,
    short_names: list[str],
    printer_columns: list[dict[str, Any]],
    scale: bool,
) -> dict[str, Any]:
    # A CRD schema may constrain metadata.name (only it): here, what the name becomes.
    name = meta_model.model_fields["name"].metadata
    name_schema = {"type": "string"}
    for constraint in name:
        if getattr(constraint, "pattern", None):
            name_schema["pattern"] = constraint.pattern
        if getattr(constraint, "max_length", None):
            name_schema["maxLength"] = constraint.max_length
    properties: dict[str, Any] = {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object", "properties": {"name": name_schema}},
        "spec": _schema(spec_model),
    }
    if status_model is not None:
        # The operator writes status whole; defaults there only trip 1.20's validation of ""
        properties["status"] = _without_defaults(_schema(status_model))
    subresources: dict[str, Any] = {}
    if status_model is not None:
        subresources["status"] = {}
    if scale:
        subresources["scale"] = {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        }
    version: dict[str, Any] = {
        "name": VERSION,
        "served": True,
        "storage": True,
        "schema": {
            "openAPIV3Schema": {
                "type": "object",
                "description": (spec_model.__doc__ or kind).strip().splitlines()[0],
                "required": ["spec"],
                "properties": properties,
            }
        },
        "additionalPrinterColumns": printer_columns,
    }
    if subresources:
        version["subresources"] = subresources
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": scope,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short_names,
                "categories": ["kvpilot"],
            },
            "versions": [version],
        },
    }


def llmservice_crd() -> dict[str, Any]:
    return _crd(
        "LLMService",
        "llmservices",
        "Namespaced",
        ServiceMeta,
        LLMServiceSpec,
        LLMServiceStatus,
        ["llms", "llmsvc"],
        [
            {"name": "Model", "type": "string", "jsonPath": ".status.model"},
            {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
            {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
            {
                "name": "TTFT-P95",
                "type": "number",
                "jsonPath": ".status.ttftP95Ms",
                "description": "Measured TTFT p95 in milliseconds",
            },
            {"name": "SLO-Met", "type": "string", "jsonPath": ".status.sloMet"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        scale=True,
    )


def servingpolicy_crd() -> dict[str, Any]:
    return _crd(
        "ServingPolicy",
        "servingpolicies",
        "Cluster",
        ObjectMeta,
        ServingPolicySpec,
        None,
        ["svp"],
        [
            {"name": "Description", "type": "string", "jsonPath": ".spec.description"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        scale=False,
    )


def render_crds() -> dict[str, str]:
    """File name -> YAML text of every CRD."""
    header = "# Generated by `kvpilot crds` from kvpilot_operator.api.types. Do not edit.\n"
    return {
        f"{crd['spec']['group']}_{crd['spec']['names']['plural']}.yaml": header
        + yaml.safe_dump(crd, sort_keys=False, width=100)
        for crd in (llmservice_crd(), servingpolicy_crd())
    }


_ROOT = source_tree()
# The package's CRD YAML (in a checkout, the repository's `crds/`) and, in a checkout, the chart's.
CRD_DIRS = (packaged("crds"), *((_ROOT / "charts" / "kvpilot" / "crds",) if _ROOT else ()))
REFERENCE = _ROOT / "docs" / "crd-reference.md" if _ROOT else None


def write_crds(dirs: tuple[Path, ...] = CRD_DIRS, reference: Path | None = None) -> list[Path]:
    written = []
    if reference is not None:
        reference.write_text(reference_markdown())
        written.append(reference)
    for directory in dirs:
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in render_crds().items():
            path = directory / name
            path.write_text(text)
            written.append(path)
    return written


def _rows(node: dict[str, Any], path: str, required: bool) -> list[str]:
    kind = node.get("type", "int or string" if node.get("x-kubernetes-int-or-string") else "")
    if kind == "array" and isinstance(node.get("items"), dict):
        kind = f"[]{node['items'].get('type', 'object')}"
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        kind = f"map[string]{node['additionalProperties'].get('type', '')}"
    rules = []
    if "enum" in node:
        rules.append(" \\| ".join(f"`{v}`" for v in node["enum"]))
    if "minimum" in node or "maximum" in node:
        rules.append(f"{node.get('minimum', '')}..{node.get('maximum', '')}")
    if "pattern" in node:
        rules.append(f"pattern `{node['pattern']}`".replace("|", "\\|"))
    if "default" in node:
        rules.append(f"default `{json.dumps(node['default'])}`")
    if required:
        rules.append("**required**")
    desc = " ".join(str(node.get("description", "")).split()).replace("|", "\\|")
    rows = [f"| `{path}` | {kind} | {'; '.join(rules)} | {desc} |"] if path else []
    props = node.get("properties") or (node.get("items") or {}).get("properties") or {}
    needed = set(node.get("required") or (node.get("items") or {}).get("required") or [])
    suffix = "[]" if kind.startswith("[]") else ""
    for name, sub in props.items():
        rows += _rows(sub, f"{path}{suffix}.{name}" if path else name, name in needed)
    return rows


def reference_markdown() -> str:
    """docs/crd-reference.md: every field of both kinds, from the same schemas as the CRDs."""
    out = [
        "# CRD reference",
        "",
        "Generated by `kvpilot crds` from `kvpilot_operator.api.types`; do not edit.",
        "Fields an LLMService leaves unset come from its ServingPolicy, then from the built-in",
        "defaults (`kvpilot_operator.api.policies`). Group `kvpilot.io`, version `v1alpha1`.",
    ]
    for crd in (llmservice_crd(), servingpolicy_crd()):
        version = crd["spec"]["versions"][0]
        schema = version["schema"]["openAPIV3Schema"]
        out += ["", f"## {crd['spec']['names']['kind']} ({crd['spec']['scope']})", ""]
        out += [schema["description"], ""]
        for part in ("spec", "status"):
            if part not in schema["properties"]:
                continue
            out += [
                f"### {part}",
                "",
                "| Field | Type | Rules | Description |",
                "| --- | --- | --- | --- |",
            ]
            out += _rows({"properties": {part: schema["properties"][part]}}, "", False)[1:]
            out.append("")
        columns = ", ".join(c["name"] for c in version["additionalPrinterColumns"])
        out += [f"Printer columns: {columns}.", ""]
    return "\n".join(out).rstrip() + "\n"
