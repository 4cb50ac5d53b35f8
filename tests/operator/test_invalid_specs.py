"""Every broken LLMService of tests/support/invalid_specs.py, through the operator's own checks
(pydantic models, policy resolution, `check_servable`) without a cluster: each is refused with a
message that starts from the field it names, and creates nothing. The same cases go through a
real API server in tests/operator/test_operator.py, and through the CRD's CEL rules in
tests/operator/test_cel.py."""

from __future__ import annotations

from typing import Any

import pytest
from kvpilot_operator.controller.manifests import RenderOptions
from kvpilot_operator.controller.reconcile import reconcile
from kvpilot_operator.controller.status import find_condition

from tests.support.invalid_specs import CASES, case_doc
from tests.support.memkube import MemoryKube


def test_the_suite_covers_the_api() -> None:
    assert len(CASES) >= 30
    assert len({label for label, _, _ in CASES}) == len(CASES)
    tops = {field.split(".")[1] for _, _, field in CASES if field.startswith("spec.")}
    assert tops >= {
        "model", "policy", "quantization", "parallelism", "engine", "resources", "image",
        "replicas", "scaling", "slo", "rollout", "router",
    }  # fmt: skip


@pytest.mark.parametrize(("label", "fields", "field"), CASES, ids=[c[0] for c in CASES])
def test_refused_naming_the_field(label: str, fields: dict[str, Any], field: str) -> None:
    kube = MemoryKube()
    doc = case_doc(0, fields)
    doc["metadata"]["namespace"] = "team"
    kube.create(doc)
    name = doc["metadata"]["name"]
    body = kube.get_llmservice("team", name)
    assert body is not None
    out = reconcile(kube, body, RenderOptions())
    assert out.problem is not None, f"{label}: accepted"
    assert field in out.problem.message, out.problem.message
    assert [k for k in kube.objects if k[1] != "LLMService"] == []
    degraded = find_condition(kube.get_llmservice("team", name) or {}, "Degraded") or {}
    assert degraded.get("status") == "True" and field in degraded.get("message", "")
