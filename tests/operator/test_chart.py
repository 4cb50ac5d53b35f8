"""The Helm chart `charts/kvpilot`: its plain files, its values schema and docs, what `helm lint`
and `helm template` make of it, and a real `helm install` into the local control plane.

The helm-dependent tests need a Helm 3 binary: $KVPILOT_HELM, else `helm` on PATH, else the copy
that `python -m tests.support.helm` puts in the kvpilot cache (tests/support/helm.py); without
it those tests skip and say how to get it.
"""

from __future__ import annotations

import json
import re
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from tests.support.helm import CHART, Doc, kinds, one, run_helm, template

if TYPE_CHECKING:
    from kvpilot_operator.local.cluster import LocalCluster

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "policies"
PRESETS = ("copilot", "interactive-chat", "offline-batch")


def operator_container(docs: list[Doc]) -> Doc:
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def parse_operator_args(container: Doc) -> Any:
    """The container's command line as the real `kvpilot` parser reads it: a flag the CLI does
    not know would crash-loop the pod, so it fails here instead."""
    from kvpilot_engine.cli import build_parser

    assert container["command"] == ["kvpilot"]
    ns = build_parser().parse_args(container["args"])
    assert ns.command == "operator"
    return ns


def load_yaml(path: Path) -> Doc:
    return yaml.safe_load(path.read_text())


def repo_policies() -> dict[str, Doc]:
    return {p.stem: load_yaml(p) for p in sorted(POLICIES.glob("*.yaml"))}


def repo_crds() -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in map(load_yaml, (CHART / "crds").glob("*.yaml"))}


# --- plain files: no helm needed ---------------------------------------------------------------


def test_policy_copies_are_byte_identical() -> None:
    originals = {p.name: p.read_bytes() for p in POLICIES.glob("*.yaml")}
    copies = {p.name: p.read_bytes() for p in (CHART / "files" / "policies").glob("*.yaml")}
    assert {f"{name}.yaml" for name in PRESETS} <= set(originals)
    assert set(copies) == set(originals), "run: cp policies/*.yaml charts/kvpilot/files/policies/"
    for name, data in originals.items():
        assert copies[name] == data, f"charts/kvpilot/files/policies/{name} differs; cp it again"


def test_chart_crds_match_generated_crds() -> None:
    # `kvpilot crds` writes both folders; an edit to one alone would ship a stale schema.
    top = REPO / "crds"
    if not top.is_dir():
        pytest.skip("no top-level crds/ folder")
    chart_crds = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert chart_crds == {p.name: p.read_bytes() for p in top.glob("*.yaml")}
    assert set(repo_crds()) == {"llmservices.kvpilot.io", "servingpolicies.kvpilot.io"}


def test_chart_yaml() -> None:
    chart = load_yaml(CHART / "Chart.yaml")
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "kvpilot"
    assert chart["version"] == "0.1.0"
    assert chart["appVersion"] == "0.1.0"
    assert chart["kubeVersion"] == ">=1.20.0-0"
    assert chart["description"].strip()


def test_chart_has_every_part() -> None:
    expected = {
        "Chart.yaml",
        "values.yaml",
        "values.schema.json",
        "README.md",
        ".helmignore",
        "templates/_helpers.tpl",
        "templates/NOTES.txt",
        "templates/deployment.yaml",
        "templates/serviceaccount.yaml",
        "templates/clusterrole.yaml",
        "templates/clusterrolebinding.yaml",
        "templates/role.yaml",
        "templates/rolebinding.yaml",
        "templates/service.yaml",
        "templates/servingpolicies.yaml",
        "templates/podmonitor.yaml",
    }
    missing = {f for f in expected if not (CHART / f).is_file()}
    assert not missing


def _values_key_lines() -> dict[str, tuple[int, list[str]]]:
    """Maps each dotted key of values.yaml to (its line index, the file's lines)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    keys: dict[str, tuple[int, list[str]]] = {}
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z][A-Za-z0-9]*):", line)
        if not m:
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group(2)))
        keys[".".join(k for _, k in stack)] = (i, lines)
    return keys


def _leaf_paths(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from _leaf_paths(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip(".")


def _readme_value_keys() -> list[str]:
    text = (CHART / "README.md").read_text()
    section = text.split("## Values", 1)[1]
    return re.findall(r"^\| `([A-Za-z0-9.]+)` \|", section, flags=re.M)


def test_every_value_is_documented() -> None:
    values = load_yaml(CHART / "values.yaml")
    documented = _readme_value_keys()
    assert len(documented) == len(set(documented)), "a value appears twice in README.md"
    key_lines = _values_key_lines()
    # Every README row names a real value, and that value carries a comment in values.yaml.
    for key in documented:
        assert key in key_lines, f"README.md documents `{key}`, which values.yaml lacks"
        i, lines = key_lines[key]
        assert i > 0 and lines[i - 1].lstrip().startswith("#"), f"`{key}` has no comment"
    # Every value is in the README table, itself or as part of a documented object.
    for leaf in _leaf_paths(values):
        assert any(leaf == k or leaf.startswith(f"{k}.") for k in documented), (
            f"`{leaf}` is missing from the README's values table"
        )


def test_values_schema_accepts_defaults_and_rejects_mistakes() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    values = load_yaml(CHART / "values.yaml")
    assert not list(validator.iter_errors(values))
    assert set(schema["properties"]) >= set(values), "a top-level value has no schema"

    def errors(path: str, value: Any) -> list[str]:
        doc = json.loads(json.dumps(values))
        node = doc
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
        return [e.message for e in validator.iter_errors(doc)]

    assert errors("image.pullPolicy", "Sometimes")
    assert errors("imageTag", "latest"), "unknown keys must be rejected, not ignored"
    assert errors("operator.replicas", "1")
    assert errors("operator.replicas", -1)
    assert not errors("operator.replicas", 2), "several replicas elect one leader"
    assert errors("operator.logLevel", "warning"), "the CLI accepts debug and info only"
    assert errors("operator.watchNamespaces", ["Not_A_Namespace"])
    assert errors("rbac.create", "yes")
    assert errors("metrics.port", 70000)
    assert not errors("operator.watchNamespaces", ["team-a", "team-b"])
    assert not errors("engine.image.digest", "sha256:" + "a" * 64)


# --- helm lint / helm template -----------------------------------------------------------------


def test_helm_lint(helm: str) -> None:
    run_helm(helm, "lint", "--strict", str(CHART))
    run_helm(
        helm,
        "lint",
        "--strict",
        str(CHART),
        "--set",
        "rbac.create=false",
        "--set",
        "serviceAccount.create=false",
        "--set",
        "policies.install=false",
        "--set",
        "metrics.enabled=false",
    )


def test_helm_rejects_values_the_schema_forbids(helm: str) -> None:
    proc = run_helm(
        helm, "template", "kv", str(CHART), "--set", "image.pullPolicy=Sometimes", check=False
    )
    assert proc.returncode != 0
    assert "pullPolicy" in proc.stderr


def test_default_render(helm: str) -> None:
    docs = template(helm)
    assert kinds(docs) == sorted(
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount",
            "ServingPolicy",
            "ServingPolicy",
            "ServingPolicy",
        ]
    )
    for d in docs:
        if d["kind"] == "ServingPolicy":
            continue  # shipped verbatim, see test_policies_rendered_verbatim
        labels = d["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "kvpilot"
        assert labels["app.kubernetes.io/instance"] == "kv"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == "kvpilot-0.1.0"
        if d["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert d["metadata"]["namespace"] == "kvpilot-system"


def test_operator_deployment(helm: str) -> None:
    docs = template(helm)
    deploy = one(docs, "Deployment")
    spec = deploy["spec"]
    pod = spec["template"]["spec"]
    c = operator_container(docs)

    assert spec["replicas"] == 1
    selector = spec["selector"]["matchLabels"]
    assert selector.items() <= spec["template"]["metadata"]["labels"].items()

    assert c["image"] == "kvpilot/operator:0.1.0"
    assert c["imagePullPolicy"] == "IfNotPresent"
    assert c["command"] == ["kvpilot"]
    assert c["args"][0] == "operator"
    assert c["args"][1:] == [
        "--engine-image=kvpilot/engine:0.1.0",
        "--router-image=kvpilot/operator:0.1.0",
        "--log-level=info",
        "--log-format=json",
        "--health-port=8080",
        "--metrics-port=9090",
    ]
    # No --namespace: every namespace.
    cli = parse_operator_args(c)
    assert cli.namespace is None
    assert cli.engine_image == "kvpilot/engine:0.1.0"
    assert cli.router_image == "kvpilot/operator:0.1.0"  # the router ships in the operator image
    assert (cli.health_port, cli.metrics_port) == (8080, 9090)
    env = {e["name"]: e for e in c["env"]}
    assert env["KVPILOT_ENGINE_IMAGE"]["value"] == "kvpilot/engine:0.1.0"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"

    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == 65532
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == 65532
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "privileged" not in sc

    # A read-only root needs somewhere writable.
    (mount,) = c["volumeMounts"]
    assert mount["mountPath"] == "/tmp"
    (volume,) = pod["volumes"]
    assert volume["name"] == mount["name"]
    assert "emptyDir" in volume

    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"health": 8080, "metrics": 9090}
    probe = c["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    assert ports[probe["port"]] == 8080

    assert c["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}
    assert c["resources"]["limits"]["memory"] == "512Mi"

    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9090",
        "prometheus.io/path": "/metrics",
    }

    sa = one(docs, "ServiceAccount")
    assert pod["serviceAccountName"] == sa["metadata"]["name"] == "kv-kvpilot"
    for binding in (one(docs, "ClusterRoleBinding"), one(docs, "RoleBinding")):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "kv-kvpilot", "namespace": "kvpilot-system"}
        ]
    assert (
        one(docs, "ClusterRoleBinding")["roleRef"]["name"]
        == one(docs, "ClusterRole")["metadata"]["name"]
    )
    assert one(docs, "RoleBinding")["roleRef"]["name"] == one(docs, "Role")["metadata"]["name"]

    svc = one(docs, "Service")
    assert svc["spec"]["selector"] == selector
    assert svc["spec"]["ports"] == [
        {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}
    ]


def _grants(role: Doc) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def _expand(group: str, resources: str, verbs: str) -> set[tuple[str, str, str]]:
    return {(group, r, v) for r in resources.split() for v in verbs.split()}


# What the operator does in the API, and nothing more (tests/operator/test_rbac.py runs it under
# these grants): writes are patches (server-side apply creates too), never updates.
WRITES = "get list watch create patch delete"
NAMESPACED_GRANTS = set().union(
    _expand("kvpilot.io", "llmservices", "get list watch patch"),
    _expand("kvpilot.io", "llmservices/status llmservices/scale", "get patch"),
    _expand("apps", "deployments", WRITES),
    _expand("", "services configmaps serviceaccounts", WRITES),
    _expand("policy", "poddisruptionbudgets", WRITES),
    _expand("networking.k8s.io", "networkpolicies", WRITES),
    # the router of each LLMService: its Role and RoleBinding
    _expand("rbac.authorization.k8s.io", "roles rolebindings", WRITES),
    _expand("", "pods", "list watch"),
    _expand("", "events", "create patch"),
    _expand("events.k8s.io", "events", "create patch"),
)
CLUSTER_ONLY_GRANTS = set().union(
    _expand("kvpilot.io", "servingpolicies", "get list watch"),
    _expand("apiextensions.k8s.io", "customresourcedefinitions", "get list watch"),
)
CLUSTER_GRANTS = NAMESPACED_GRANTS | CLUSTER_ONLY_GRANTS
LEASE_GRANTS = _expand("coordination.k8s.io", "leases", "get create update")


def test_rbac_is_least_privilege(helm: str) -> None:
    docs = template(helm)
    roles = [d for d in docs if d["kind"] in ("ClusterRole", "Role")]
    assert len(roles) == 2
    for role in roles:
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert not any("*" in item for item in rule[field]), f"wildcard in {rule}"
            assert "resourceNames" not in rule and "nonResourceURLs" not in rule
    assert _grants(one(docs, "ClusterRole")) == CLUSTER_GRANTS
    # The Lease is namespaced to the release, never cluster-wide.
    assert _grants(one(docs, "Role")) == LEASE_GRANTS
    cluster_resources = {r for _, r, _ in CLUSTER_GRANTS}
    assert not cluster_resources & {"secrets", "leases", "clusterroles", "clusterrolebindings"}


def test_watched_namespaces_get_roles_not_cluster_grants(helm: str) -> None:
    docs = template(helm, "--set", "operator.watchNamespaces={team-a,team-b}")
    assert _grants(one(docs, "ClusterRole")) == CLUSTER_ONLY_GRANTS
    roles = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "Role"}
    assert set(roles) == {"team-a", "team-b", "kvpilot-system"}
    assert _grants(roles["kvpilot-system"]) == LEASE_GRANTS
    for namespace in ("team-a", "team-b"):
        assert _grants(roles[namespace]) == NAMESPACED_GRANTS
        (binding,) = [
            d for d in docs
            if d["kind"] == "RoleBinding" and d["metadata"]["namespace"] == namespace
        ]  # fmt: skip
        assert binding["roleRef"]["name"] == roles[namespace]["metadata"]["name"]
        assert binding["subjects"][0]["namespace"] == "kvpilot-system"


def test_toggles_drop_their_objects(helm: str) -> None:
    docs = template(helm, "--set", "rbac.create=false")
    assert not {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"} & set(kinds(docs))
    assert "ServiceAccount" in kinds(docs)

    docs = template(helm, "--set", "policies.install=false")
    assert "ServingPolicy" not in kinds(docs)

    docs = template(helm, "--set", "serviceAccount.create=false")
    assert "ServiceAccount" not in kinds(docs)
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "default"
    assert one(docs, "RoleBinding")["subjects"][0]["name"] == "default"

    docs = template(
        helm, "--set", "serviceAccount.create=false", "--set", "serviceAccount.name=ops"
    )
    assert one(docs, "ClusterRoleBinding")["subjects"][0]["name"] == "ops"

    docs = template(helm, "--set", "metrics.enabled=false")
    assert "Service" not in kinds(docs)
    deploy = one(docs, "Deployment")
    assert "annotations" not in deploy["spec"]["template"]["metadata"]
    assert [p["name"] for p in operator_container(docs)["ports"]] == ["health"]
    assert parse_operator_args(operator_container(docs)).metrics_port == 0


def test_custom_images_and_namespaces(helm: str) -> None:
    docs = template(
        helm,
        "--set",
        "engine.image.repository=registry.example.com/kvpilot/engine",
        "--set",
        "engine.image.tag=9.9.9-rc1",
        "--set",
        "image.repository=registry.example.com/kvpilot/operator",
        "--set",
        "image.digest=sha256:" + "ab" * 32,
        "--set",
        "operator.watchNamespaces={team-a,team-b}",
        "--set",
        "operator.logLevel=debug",
        "--set",
        "operator.extraArgs={--kubeconfig=/etc/kvpilot/kubeconfig}",
    )
    c = operator_container(docs)
    engine = "registry.example.com/kvpilot/engine:9.9.9-rc1"
    assert f"--engine-image={engine}" in c["args"]
    assert {e["name"]: e.get("value") for e in c["env"]}["KVPILOT_ENGINE_IMAGE"] == engine
    assert c["image"] == "registry.example.com/kvpilot/operator@sha256:" + "ab" * 32
    assert [a for a in c["args"] if a.startswith("--namespace")] == [
        "--namespace=team-a",
        "--namespace=team-b",
    ]
    assert "--log-level=debug" in c["args"]
    assert c["args"][-1] == "--kubeconfig=/etc/kvpilot/kubeconfig"
    cli = parse_operator_args(c)
    assert cli.namespace == ["team-a", "team-b"]
    assert cli.engine_image == engine
    assert cli.log_level == "debug"
    assert cli.kubeconfig == "/etc/kvpilot/kubeconfig"


def test_autoscaler_values_become_operator_flags(helm: str) -> None:
    off = parse_operator_args(operator_container(template(helm)))
    assert off.prometheus_url == ""  # no Prometheus, no autoscaling
    docs = template(
        helm,
        "--set",
        "autoscaler.prometheusUrl=http://prometheus.monitoring:9090",
        "--set",
        "autoscaler.interval=30",
        "--set-string",
        'autoscaler.selector=namespace="{namespace}"\\,app="{name}"',
    )
    cli = parse_operator_args(operator_container(docs))
    assert cli.prometheus_url == "http://prometheus.monitoring:9090"
    assert cli.autoscale_interval == 30
    assert cli.prometheus_selector == 'namespace="{namespace}",app="{name}"'


def test_prometheus_access_values_become_operator_flags(helm: str) -> None:
    """TLS and auth for a Thanos/Mimir or kube-rbac-proxy Prometheus, with the CA mounted from a
    Secret; without them, no flag (plain settings, as before)."""
    default = parse_operator_args(operator_container(template(helm)))
    assert (default.prometheus_ca_file, default.prometheus_header) == ("", None)
    values = {
        "autoscaler": {
            "prometheusUrl": "https://thanos-query.monitoring:10902",
            "caFile": "/etc/kvpilot/prometheus-ca/ca.crt",
            "bearerTokenFile": "/var/run/secrets/kubernetes.io/serviceaccount/token",
            "headers": {"X-Scope-OrgID": "tenant-a", "X-Extra": "1"},
        },
        "operator": {
            "extraVolumes": [{"name": "prom-ca", "secret": {"secretName": "prometheus-ca"}}],
            "extraVolumeMounts": [
                {"name": "prom-ca", "mountPath": "/etc/kvpilot/prometheus-ca", "readOnly": True}
            ],
        },
    }
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(values, f)
        f.flush()
        docs = template(helm, "-f", f.name)
        bad = run_helm(
            helm, "template", "kv", str(CHART), "-f", f.name,
            "--set", "autoscaler.insecureSkipVerify=true", check=False,
        )  # fmt: skip
    assert bad.returncode != 0, "a CA file and skipping verification contradict each other"
    c = operator_container(docs)
    cli = parse_operator_args(c)
    assert cli.prometheus_ca_file == "/etc/kvpilot/prometheus-ca/ca.crt"
    assert cli.prometheus_bearer_token_file.endswith("serviceaccount/token")
    assert sorted(cli.prometheus_header) == [("X-Extra", "1"), ("X-Scope-OrgID", "tenant-a")]
    assert cli.prometheus_insecure_skip_verify is False
    assert {"name": "prom-ca", "mountPath": "/etc/kvpilot/prometheus-ca", "readOnly": True} in c[
        "volumeMounts"
    ]
    volumes = one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "prom-ca", "secret": {"secretName": "prometheus-ca"}} in volumes
    insecure = template(
        helm,
        "--set", "autoscaler.prometheusUrl=https://prometheus.monitoring:9090",
        "--set", "autoscaler.insecureSkipVerify=true",
    )  # fmt: skip
    assert parse_operator_args(operator_container(insecure)).prometheus_insecure_skip_verify


def test_scheduling_values_pass_through(helm: str) -> None:
    values = {
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [
            {"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}
        ],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": "pool", "operator": "In", "values": ["system"]}
                            ]
                        }
                    ]
                }
            }
        },
        "priorityClassName": "system-cluster-critical",
        "resources": {"requests": {"cpu": "250m", "memory": "300Mi"}},
        "podLabels": {"team": "ml-platform"},
        "podAnnotations": {"example.com/owner": "ml"},
        "imagePullSecrets": [{"name": "regcred"}],
    }
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(values, f)
        f.flush()
        docs = template(helm, "-f", f.name)
    pod_template = one(docs, "Deployment")["spec"]["template"]
    pod = pod_template["spec"]
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName", "imagePullSecrets"):
        assert pod[key] == values[key]
    # Helm merges user maps into the defaults: requests replaced, the default limit kept.
    assert operator_container(docs)["resources"] == {
        "requests": {"cpu": "250m", "memory": "300Mi"},
        "limits": {"memory": "512Mi"},
    }
    assert pod_template["metadata"]["labels"]["team"] == "ml-platform"
    assert pod_template["metadata"]["annotations"]["example.com/owner"] == "ml"
    assert pod_template["metadata"]["annotations"]["prometheus.io/scrape"] == "true"


def test_crds_included(helm: str) -> None:
    docs = template(helm, "--include-crds")
    crds = {d["metadata"]["name"]: d for d in docs if d["kind"] == "CustomResourceDefinition"}
    assert crds == repo_crds()
    # Without --include-crds, `helm template` leaves them out (helm install still applies them).
    assert "CustomResourceDefinition" not in kinds(template(helm))


def test_policies_rendered_verbatim(helm: str) -> None:
    rendered = {d["metadata"]["name"]: d for d in template(helm) if d["kind"] == "ServingPolicy"}
    expected = {d["metadata"]["name"]: d for d in repo_policies().values()}
    assert set(rendered) == set(PRESETS)
    assert rendered == expected


# --- a real install ----------------------------------------------------------------------------


def _notes_sample(notes: str) -> str:
    """The sample LLMService the install notes print, de-indented."""
    lines = notes.splitlines()
    start = lines.index("  apiVersion: kvpilot.io/v1alpha1")
    block: list[str] = []
    for line in lines[start:]:
        if not line.strip():
            break
        block.append(line[2:])
    return "\n".join(block) + "\n"


@pytest.mark.slow
def test_helm_install_into_local_cluster(helm: str, cluster: LocalCluster) -> None:
    """The API server takes every object (the presets against the CRD schema too), the RBAC
    grants what the operator needs and no more, and the notes' sample LLMService is valid."""
    suffix = uuid.uuid4().hex[:6]
    release, ns = f"kvp-{suffix}", f"kvpilot-system-{suffix}"
    kube = ["--kubeconfig", str(cluster.kubeconfig)]
    # The cluster is shared with other tests, which may have applied the presets already; Helm
    # refuses to adopt objects it did not create.
    existing = cluster.kubectl("get", "servingpolicies", "-o", "name", check=False).stdout
    presets_free = not any(f"/{name}" in existing for name in PRESETS)
    run_helm(
        helm,
        "install",
        release,
        str(CHART),
        "--namespace",
        ns,
        "--create-namespace",
        *kube,
        "--set",
        f"policies.install={str(presets_free).lower()}",
    )
    try:
        notes = run_helm(helm, "get", "notes", release, "--namespace", ns, *kube).stdout
        assert "kubectl apply -f llmservice.yaml" in notes
        assert "interactive-chat" in notes or not presets_free

        if presets_free:
            # Served as shipped: the CRD's structural schema pruned or defaulted nothing.
            policies = json.loads(cluster.kubectl("get", "servingpolicies", "-o", "json").stdout)
            served = {p["metadata"]["name"]: p["spec"] for p in policies["items"]}
            for name, doc in repo_policies().items():
                assert served.get(name) == doc["spec"], f"ServingPolicy {name} as served differs"

        deploy = json.loads(
            cluster.kubectl(
                "get", "deployment", f"{release}-kvpilot", "-n", ns, "-o", "json"
            ).stdout
        )
        assert deploy["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 65532

        # The sample a user copies from the notes passes the CRD's validation.
        cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=_notes_sample(notes))

        sa = f"system:serviceaccount:{ns}:{release}-kvpilot"

        def can(*args: str) -> bool:
            out = cluster.kubectl("auth", "can-i", "--as", sa, *args, check=False).stdout.strip()
            # Anything but a plain answer (a typo in a resource name) must not read as "no".
            assert out in ("yes", "no"), f"kubectl auth can-i {' '.join(args)}: {out!r}"
            return out == "yes"

        assert can("patch", "llmservices.kvpilot.io", "--subresource=scale", "-A")
        assert can("patch", "llmservices.kvpilot.io", "--subresource=status", "-n", "default")
        assert not can("update", "llmservices.kvpilot.io", "--subresource=status", "-n", "default")
        assert can("watch", "servingpolicies.kvpilot.io")
        assert can("delete", "deployments.apps", "-n", "default")
        assert can("create", "poddisruptionbudgets.policy", "-n", "default")
        assert can("create", "events.events.k8s.io", "-n", "default")
        assert can("list", "pods", "-A")
        assert not can("list", "endpointslices.discovery.k8s.io", "-A")
        assert can("update", "leases.coordination.k8s.io", "-n", ns)
        assert not can("update", "leases.coordination.k8s.io", "-n", "default")
        assert not can("create", "servingpolicies.kvpilot.io")
        assert not can("delete", "llmservices.kvpilot.io", "-n", "default")
        assert not can("create", "llmservices.kvpilot.io", "-n", "default")
        assert not can("get", "secrets", "-n", ns)
        # The router's Role: granted by the operator, which holds what it grants.
        assert can("create", "roles.rbac.authorization.k8s.io", "-n", "default")
        assert can("create", "configmaps", "-n", "default")
        assert not can("escalate", "roles.rbac.authorization.k8s.io", "-n", "default")
        assert not can("delete", "pods", "-n", "default")
        assert not can("create", "clusterrolebindings.rbac.authorization.k8s.io")
    finally:
        run_helm(helm, "uninstall", release, "--namespace", ns, *kube, check=False)
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
