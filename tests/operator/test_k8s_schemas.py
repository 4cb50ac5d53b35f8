"""Everything kvpilot renders validates against the Kubernetes OpenAPI schemas of every version
from 1.29 to the newest kubernetes-validate bundles (offline: the JSON schemas ship in the
package), in strict mode (a field no Kubernetes version knows is an error, not silently pruned).

Left out, and why: kinds of kvpilot's own CRDs (kvpilot.io: LLMService, ServingPolicy) have no
schema there; the CRDs' schemas are tested through the real API server and test_cel.py. Kinds of
the Prometheus Operator (monitoring.coreos.com: PodMonitor, PrometheusRule) are not part of
Kubernetes; test_podmonitor.py checks the PodMonitors against what they must select.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import pytest
from packaging.version import Version

from tests.support.helm import Doc, template
from tests.support.rendered import EVERYTHING, EXAMPLES, kvpilot_render, with_canary

kv = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]'")
SKIPPED_GROUPS = ("kvpilot.io/", "monitoring.coreos.com/")
OLDEST = Version("1.29")
VERSIONS = [v for v in kv.utils.all_versions() if Version(v) >= OLDEST]


@pytest.fixture(scope="module", autouse=True)
def parsed_once() -> Iterator[None]:
    """kubernetes-validate reads and parses a version's schema files (the definitions file is
    megabytes) on every call; parsed once per file, the checks here take a fifth of the time."""
    with pytest.MonkeyPatch.context() as mp:
        cached = functools.lru_cache(maxsize=None)(kv.utils.schema_contents)
        mp.setattr(kv.utils, "schema_contents", cached)
        yield


def test_validator_covers_1_29_to_a_recent_release() -> None:
    assert VERSIONS[0] == "1.29.0"
    assert Version(VERSIONS[-1]) >= Version("1.33"), VERSIONS


def validate(objects: list[Doc]) -> list[str]:
    """Every (version, object, error) the schemas find; checked kinds must have a schema."""
    errors = []
    checked = 0
    for obj in objects:
        if obj["apiVersion"].startswith(SKIPPED_GROUPS):
            continue
        checked += 1
        for version in VERSIONS:
            try:
                kv.validate(obj, version, strict=True)
            except kv.utils.ValidationError as err:
                path = ".".join(str(p) for p in err.absolute_path)
                errors.append(
                    f"{version} {obj['kind']}/{obj['metadata']['name']}: {path}: {err.message}"
                )
            except kv.utils.SchemaNotFoundError as err:
                errors.append(f"{version}: {err.message}")
    assert checked, "nothing was validated"
    return errors


def rendered() -> list[Doc]:
    objects: list[Doc] = []
    for path in EXAMPLES:
        text = path.read_text()
        if "kind: LLMService" in text:
            objects += kvpilot_render(text)
            # policy/v1beta1 for clusters before 1.21 is not served from 1.25 on; only v1 here.
    objects += kvpilot_render(EVERYTHING)
    objects += with_canary(EVERYTHING)
    return objects


def test_kvpilot_render_validates_against_every_version() -> None:
    objects = rendered()
    kinds = {o["kind"] for o in objects}
    # Every kind the operator creates is among them.
    expected = {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "ServiceAccount"}
    assert expected | {"Role", "RoleBinding"} <= kinds, kinds
    assert validate(objects) == []


def test_a_broken_manifest_is_caught() -> None:
    """The check has teeth: a typo'd field and a wrong type are found in every version."""
    deploy = next(o for o in kvpilot_render(EVERYTHING) if o["kind"] == "Deployment")
    typo: dict[str, Any] = {**deploy, "spec": {**deploy["spec"], "replica": 2}}
    wrong = {**deploy, "spec": {**deploy["spec"], "replicas": "two"}}
    assert len(validate([typo])) == len(VERSIONS)
    assert len(validate([wrong])) == len(VERSIONS)


HELM_VARIANTS = {
    "defaults": (),
    "monitoring and crds": (
        "--include-crds",
        "--set", "monitoring.podMonitor.enabled=true",
        "--set", "monitoring.prometheusRule.enabled=true",
        "--set", "monitoring.dashboards.enabled=true",
    ),
    "autoscaler behind TLS, namespaced, HA": (
        "--set", "autoscaler.prometheusUrl=https://thanos.monitoring:10902",
        "--set", "autoscaler.caFile=/etc/ca/ca.crt",
        "--set", "autoscaler.bearerTokenFile=/var/run/secrets/kubernetes.io/serviceaccount/token",
        "--set", "autoscaler.headers.X-Scope-OrgID=tenant-a",
        "--set", "operator.extraVolumes[0].name=ca",
        "--set", "operator.extraVolumes[0].secret.secretName=prometheus-ca",
        "--set", "operator.extraVolumeMounts[0].name=ca",
        "--set", "operator.extraVolumeMounts[0].mountPath=/etc/ca",
        "--set", "operator.watchNamespaces={team-a,team-b}",
        "--set", "operator.replicas=2",
        "--set", "metrics.enabled=false",
        "--set", "tmpSizeLimit=",
    ),
}  # fmt: skip


@pytest.mark.parametrize("variant", list(HELM_VARIANTS))
def test_helm_template_validates_against_every_version(helm: str, variant: str) -> None:
    docs = template(helm, *HELM_VARIANTS[variant])
    assert validate(docs) == []
    if variant == "monitoring and crds":
        assert "CustomResourceDefinition" in {d["kind"] for d in docs}
