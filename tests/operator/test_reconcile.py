"""`reconcile()` without a cluster: the in-memory stand-in (tests/support/memkube.py) in place of
the Kubernetes wrapper, so creating, updating, deleting and status reporting run in milliseconds.
The same paths against a real API server are in test_operator.py."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from kvpilot_operator.api.names import engine_name, router_name
from kvpilot_operator.api.types import API_VERSION
from kvpilot_operator.controller.kube import FIELD_MANAGER, own_fields
from kvpilot_operator.controller.manifests import RenderOptions, spec_annotation
from kvpilot_operator.controller.reconcile import reconcile
from kvpilot_operator.controller.status import find_condition

from tests.support.memkube import MemoryKube

NS, NAME = "team", "chat"
OPTS = RenderOptions()
OWNED = {
    ("Deployment", engine_name(NAME)),
    ("Deployment", router_name(NAME)),
    ("ConfigMap", router_name(NAME)),
    ("ServiceAccount", router_name(NAME)),
    ("Role", router_name(NAME)),
    ("RoleBinding", router_name(NAME)),
    ("Service", NAME),
    ("PodDisruptionBudget", engine_name(NAME)),
    ("NetworkPolicy", engine_name(NAME)),
    ("NetworkPolicy", router_name(NAME)),
}


def service(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "LLMService",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {"model": {"source": {"path": "smollm2"}}, "replicas": 1, **spec},
    }


@pytest.fixture
def kube() -> MemoryKube:
    return MemoryKube()


def owned(kube: MemoryKube) -> set[tuple[str, str]]:
    return {(k[1], k[3]) for k in kube.objects if k[2] == NS and k[1] != "LLMService"}


def live(kube: MemoryKube) -> dict[str, Any]:
    body = kube.get_llmservice(NS, NAME)
    assert body is not None
    return body


def cond(kube: MemoryKube, kind: str) -> dict[str, Any]:
    return find_condition(live(kube), kind) or {}


def test_first_reconcile_creates_every_owned_object_and_reports_status(kube: MemoryKube) -> None:
    kube.create(service())
    out = reconcile(kube, live(kube), OPTS)
    assert out.problem is None
    assert owned(kube) == OWNED
    assert sorted(out.actions) == sorted(f"created {kind} {NS}/{name}" for kind, name in OWNED)
    status = live(kube)["status"]
    assert status["observedGeneration"] == 1
    assert status["endpoint"] == f"http://{NAME}.{NS}.svc.cluster.local:8000/v1"
    assert status["selector"] == f"kvpilot.io/llmservice={NAME},app.kubernetes.io/component=engine"
    assert cond(kube, "Ready")["status"] == "False"  # nothing runs the pods here
    assert cond(kube, "Degraded")["status"] == "False"


def test_a_second_reconcile_changes_nothing(kube: MemoryKube) -> None:
    kube.create(service())
    reconcile(kube, live(kube), OPTS)
    before = copy.deepcopy(kube.objects)
    out = reconcile(kube, live(kube), OPTS)
    assert out.actions == [] and out.status is None
    assert kube.objects == before  # no resourceVersion moved: no churn, no events


def test_spec_change_updates_in_place_and_drift_is_restored(kube: MemoryKube) -> None:
    kube.create(service())
    reconcile(kube, live(kube), OPTS)
    kube.update_spec(NS, NAME, service(engine={"maxNumSeqs": 7})["spec"])
    kube.delete("v1", "ConfigMap", router_name(NAME), NS)  # someone deleted the router's routes
    out = reconcile(kube, live(kube), OPTS)
    assert f"updated Deployment {NS}/{engine_name(NAME)}" in out.actions
    assert f"created ConfigMap {NS}/{router_name(NAME)}" in out.actions
    deployment = kube.get("apps/v1", "Deployment", engine_name(NAME), NS)
    assert deployment is not None
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--max-num-seqs") + 1] == "7"
    assert live(kube)["status"]["observedGeneration"] == 2


def test_status_follows_the_engine_deployment(kube: MemoryKube) -> None:
    kube.create(service())
    reconcile(kube, live(kube), OPTS)
    ready = {"replicas": 1, "readyReplicas": 1, "availableReplicas": 1, "updatedReplicas": 1}
    kube.set_status("apps/v1", "Deployment", engine_name(NAME), NS, ready)
    calls = len(kube.calls)
    out = reconcile(kube, live(kube), OPTS, apply=False)
    assert out.actions == []
    assert [c for c in kube.calls[calls:] if c[0] in ("apply", "dry-run")] == []  # reads only
    # Engines up, but no router to reach them through (a missing API-key Secret, say).
    assert (cond(kube, "Ready")["status"], cond(kube, "Ready")["reason"]) == (
        "False",
        "RouterUnavailable",
    )
    assert "0/1 router replicas available" in cond(kube, "Ready")["message"]
    kube.set_status("apps/v1", "Deployment", router_name(NAME), NS, ready)
    reconcile(kube, live(kube), OPTS, apply=False)
    assert cond(kube, "Ready")["status"] == "True"
    assert live(kube)["status"]["readyReplicas"] == 1


@pytest.mark.parametrize(
    ("spec", "reason", "says"),
    [
        ({"policy": "nope"}, "PolicyNotFound", "spec.policy: ServingPolicy 'nope' does not exist"),
        ({"replicas": -1}, "InvalidSpec", "spec.replicas: "),
        (
            {"scaling": {"minReplicas": 3, "maxReplicas": 2}},
            "InvalidSpec",
            "spec.scaling: minReplicas (3) is greater than maxReplicas (2)",
        ),
        (
            {"parallelism": {"tensor": 4}, "resources": {"gpu": {"count": 4}}},
            "InvalidSpec",
            "spec.parallelism.tensor (4) cannot split smollm2",
        ),
    ],
)
def test_unservable_specs_create_nothing_and_say_why(
    kube: MemoryKube, spec: dict[str, Any], reason: str, says: str
) -> None:
    kube.create(service(**spec))
    out = reconcile(kube, live(kube), OPTS)
    assert out.problem is not None and out.problem.reason == reason
    assert says in out.problem.message
    assert owned(kube) == set()
    degraded = cond(kube, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", reason)
    assert says in degraded["message"]


def test_a_policy_that_appears_later_is_used(kube: MemoryKube) -> None:
    kube.create(service(policy="fast"))
    assert reconcile(kube, live(kube), OPTS).problem is not None
    kube.create(
        {
            "apiVersion": API_VERSION,
            "kind": "ServingPolicy",
            "metadata": {"name": "fast"},
            "spec": {"engine": {"maxNumSeqs": 3}},
        }
    )
    out = reconcile(kube, live(kube), OPTS)
    assert out.problem is None and out.spec is not None
    assert out.spec.engine.max_num_seqs == 3
    assert cond(kube, "Degraded")["status"] == "False"


def test_an_apply_the_server_refuses_is_reported_and_stops_the_pass(kube: MemoryKube) -> None:
    kube.create(service())
    kube.fail_apply["Deployment"] = (503, "Service Unavailable")  # transient: retried
    out = reconcile(kube, live(kube), OPTS)
    assert out.problem is not None and out.problem.reason == "ApplyFailed"
    assert "Service Unavailable" in out.problem.message
    applies = [c for c in kube.calls if c[0] == "apply"]
    assert applies == [("apply", "Deployment", engine_name(NAME))]
    assert cond(kube, "Degraded")["reason"] == "ApplyFailed"


def test_a_refused_object_leaves_nothing_half_created(kube: MemoryKube) -> None:
    """A 422 for one object (the router's Deployment here, applied after the engine's) is found
    by the dry run of the whole set: nothing is created, the problem is permanent (no retry) and
    says what the API server said."""
    kube.create(service())
    kube.fail_apply["Deployment"] = (422, "Unprocessable Entity")
    out = reconcile(kube, live(kube), OPTS)
    assert out.problem is not None and out.problem.reason == "ApplyRejected"
    assert "Unprocessable Entity" in out.problem.message
    assert not [c for c in kube.calls if c[0] == "apply"]
    assert kube.get("v1", "ConfigMap", router_name(NAME), NS) is None
    assert cond(kube, "Degraded")["reason"] == "ApplyRejected"
    # Once the cause is gone, the next pass creates everything.
    del kube.fail_apply["Deployment"]
    out = reconcile(kube, live(kube), OPTS)
    assert out.problem is None and kube.get("v1", "ConfigMap", router_name(NAME), NS) is not None


def test_canary_starts_beside_stable_and_goes_when_its_config_is_removed(kube: MemoryKube) -> None:
    canary = {"canary": {"steps": [25, 100], "stepSeconds": 60}}
    kube.create(service(replicas=4, rollout=canary))
    reconcile(kube, live(kube), OPTS)
    stable = kube.get("apps/v1", "Deployment", engine_name(NAME), NS)
    assert stable is not None and "kvpilot.io/serving-spec" in stable["metadata"]["annotations"]

    changed = service(replicas=4, rollout=canary, engine={"maxNumSeqs": 9})["spec"]
    kube.update_spec(NS, NAME, changed)
    out = reconcile(kube, live(kube), OPTS)
    assert f"created Deployment {NS}/{engine_name(NAME, 'canary')}" in out.actions
    status = live(kube)["status"]
    assert (status["canary"]["phase"], status["canary"]["weight"]) == ("Progressing", 25)
    canary_dep = kube.get("apps/v1", "Deployment", engine_name(NAME, "canary"), NS)
    assert canary_dep is not None and canary_dep["spec"]["replicas"] == 1  # ceil(4 * 25%)
    # The stable Deployment still serves the old revision.
    stable_after = kube.get("apps/v1", "Deployment", engine_name(NAME), NS)
    assert stable_after == stable

    without = {k: v for k, v in changed.items() if k != "rollout"}
    kube.update_spec(NS, NAME, without)
    out = reconcile(kube, live(kube), OPTS)
    assert f"deleted Deployment {NS}/{engine_name(NAME, 'canary')}" in out.actions
    assert "canary" not in live(kube)["status"]
    stable_now = kube.get("apps/v1", "Deployment", engine_name(NAME), NS)
    assert stable_now is not None
    assert stable_now["metadata"]["annotations"]["kvpilot.io/serving-spec"] == spec_annotation(
        out.spec  # type: ignore[arg-type]
    )


def _engine_pod(state: dict[str, Any], last: dict[str, Any] | None = None) -> dict[str, Any]:
    labels = {"kvpilot.io/llmservice": NAME, "app.kubernetes.io/component": "engine",
              "kvpilot.io/track": "stable"}  # fmt: skip
    status = {"name": "engine", "state": state, **({"lastState": last} if last else {})}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{NAME}-engine-abc", "namespace": NS, "labels": labels},
        "status": {"phase": "Running", "containerStatuses": [status]},
    }


def test_an_engine_that_fails_to_start_says_why(kube: MemoryKube) -> None:
    """The engine's last log line, the termination message under FallbackToLogsOnError, is the
    Degraded message; the crash loop's own state says it when there is no message."""
    kube.create(service())
    reconcile(kube, live(kube), OPTS)
    dep = kube.get("apps/v1", "Deployment", engine_name(NAME), NS)
    assert dep is not None
    assert dep["spec"]["template"]["spec"]["containers"][0]["terminationMessagePolicy"] == (
        "FallbackToLogsOnError"
    )
    log_tail = (
        '{"event": "Application shutdown complete.", "level": "info"}\n'
        '{"error": "model \'/m/x.gguf\' is neither a local path nor a bundled model", '
        '"event": "exiting: the engine failed", "level": "error"}\n'
    )
    ended = {"terminated": {"exitCode": 1, "reason": "Error", "message": log_tail}}
    kube.create(_engine_pod({"waiting": {"reason": "CrashLoopBackOff"}}, last=ended))
    reconcile(kube, live(kube), OPTS, apply=False)
    degraded = cond(kube, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "EngineFailing")
    assert degraded["message"] == (
        f"engine pod {NAME}-engine-abc exited with code 1: "
        "model '/m/x.gguf' is neither a local path nor a bundled model"
    )
    kube.delete("v1", "Pod", f"{NAME}-engine-abc", NS)
    kube.create(_engine_pod({"waiting": {"reason": "ImagePullBackOff", "message": "no such"}}))
    reconcile(kube, live(kube), OPTS, apply=False)
    assert cond(kube, "Degraded")["message"] == (
        f"engine pod {NAME}-engine-abc: ImagePullBackOff: no such"
    )
    # The engines come up: Degraded clears.
    kube.delete("v1", "Pod", f"{NAME}-engine-abc", NS)
    ready = {"replicas": 1, "readyReplicas": 1, "availableReplicas": 1, "updatedReplicas": 1}
    kube.set_status("apps/v1", "Deployment", engine_name(NAME), NS, ready)
    reconcile(kube, live(kube), OPTS, apply=False)
    assert cond(kube, "Degraded")["status"] == "False"


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ({"image": "docker.io/someone/engine:1"}, "spec.image: 'docker.io/someone/engine:1'"),
        ({"engine": {"extraArgs": ["--trust-remote-code"]}}, "spec.engine.extraArgs: --trust"),
        (
            {"rollout": {"shadow": {"image": "ghcr.io/x/y:2"}}},
            "spec.rollout.shadow.image: 'ghcr.io/x/y:2'",
        ),
        (
            {
                "adapters": [
                    {"name": "sql", "source": {"path": "/adapters/sql"}},
                    {"name": "support", "source": {"path": "/adapters/support"}},
                ]
            },
            "spec.adapters: 2 adapters, more than the 1 allowed",
        ),
    ],
)
def test_a_policys_limits_refuse_what_they_do_not_allow(
    kube: MemoryKube, spec: dict[str, Any], says: str
) -> None:
    limits = {"images": ["registry.corp/kvpilot/"], "extraArgs": ["--seed"], "maxAdapters": 1}
    kube.create(
        {
            "apiVersion": API_VERSION,
            "kind": "ServingPolicy",
            "metadata": {"name": "guarded"},
            "spec": {"limits": limits, "engine": {"maxNumSeqs": 4}},
        }
    )
    kube.create(service(policy="guarded", **spec))
    out = reconcile(kube, live(kube), OPTS)
    assert out.problem is not None and out.problem.reason == "NotAllowed"
    assert (
        out.problem.message.startswith(says) and "in ServingPolicy guarded" in out.problem.message
    )
    assert owned(kube) == set()
    # What the limits allow is served.
    allowed = {
        "image": "registry.corp/kvpilot/engine:0.2",
        "engine": {"extraArgs": ["--seed=4"]},
        "adapters": [{"name": "sql", "source": {"path": "/adapters/sql"}}],
    }
    kube.update_spec(NS, NAME, service(policy="guarded", **allowed)["spec"])
    out = reconcile(kube, live(kube), OPTS)
    assert out.problem is None and owned(kube) == OWNED


def test_own_fields_change_only_with_the_operators_fields() -> None:
    """What tells the operator's handlers that an owned object drifted: the managedFields entry
    of its own applies, not the whole object (a token controller adding a ServiceAccount's
    secret, or a user's extra label, is nobody's drift)."""

    def obj(*entries: dict[str, Any]) -> dict[str, Any]:
        return {"kind": "ConfigMap", "metadata": {"name": "x", "managedFields": list(entries)}}

    ours = {"manager": FIELD_MANAGER, "operation": "Apply", "fieldsV1": {"f:data": {"f:a": {}}}}
    theirs = {"manager": "kubectl-label", "operation": "Update", "fieldsV1": {"f:metadata": {}}}
    assert own_fields(obj(ours)) == own_fields(obj(theirs, ours))
    assert own_fields(obj(ours)) != own_fields(obj({**ours, "fieldsV1": {"f:data": {}}}))
    assert own_fields(obj(theirs)) is None
    assert own_fields(obj({**ours, "operation": "Update"})) is None  # not one of its applies
