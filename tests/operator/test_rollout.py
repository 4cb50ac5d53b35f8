"""Rollouts without a cluster: revisions, the plan reconcile derives from the live stable
Deployment and status.canary, the router objects and routes, and the canary state machine."""

from __future__ import annotations

import datetime as dt
from typing import Any

from kvpilot_operator.api.names import ENGINE_SERIES, REVISION_LABEL, ROUTES_KEY
from kvpilot_operator.api.policies import resolve_spec
from kvpilot_operator.api.types import CanaryAnalysis, CanarySpec, CanaryStatus, LLMService
from kvpilot_operator.controller.manifests import Plan, RenderOptions, render, revision_of, routes
from kvpilot_operator.rollout.canary import advance_canary, judge, shadow_condition, stable_runs
from kvpilot_operator.rollout.plan import plan_rollout

T0 = dt.datetime(2026, 12, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
STAMP = "2026-12-01T12:00:00Z"


def service(**spec: Any) -> LLMService:
    body = {"model": {"source": {"path": "smollm2"}}, "quantization": "none", **spec}
    return LLMService.model_validate(
        {"metadata": {"name": "chat", "namespace": "ns", "uid": "u-1"}, "spec": body}
    )


def objects(svc: LLMService, plan: Plan | None = None) -> dict[str, dict[str, Any]]:
    spec = resolve_spec(svc.spec, None)
    return {
        f"{o['kind']}/{o['metadata']['name']}": o for o in render(svc, spec, RenderOptions(), plan)
    }


def args(obj: dict[str, Any]) -> list[str]:
    return obj["spec"]["template"]["spec"]["containers"][0]["args"]


CANARY = {"canary": {"steps": [10, 50, 100], "stepSeconds": 30}}


def test_revision_follows_what_engines_run_not_how_they_scale() -> None:
    base = service()
    rev = revision_of(base, resolve_spec(base.spec, None))
    for same in (
        service(replicas=3),
        service(scaling={"maxReplicas": 9}),
        service(slo={"ttft": {"targetMs": 100}}),
        service(rollout=CANARY),
    ):
        assert revision_of(same, resolve_spec(same.spec, None)) == rev
    for other in (
        service(quantization="int8"),
        service(engine={"maxNumSeqs": 8}),
        service(image="kvpilot/engine:next"),
    ):
        assert revision_of(other, resolve_spec(other.spec, None)) != rev


def test_a_spec_change_with_a_canary_starts_it_beside_the_stable_revision() -> None:
    old = service(rollout=CANARY, replicas=4)
    old_spec = resolve_spec(old.spec, None)
    live_stable = objects(old)["Deployment/chat-engine"]
    new = service(rollout=CANARY, replicas=4, engine={"maxNumSeqs": 8})
    new_spec = resolve_spec(new.spec, None)

    plan, started = plan_rollout(new, new_spec, live_stable, None, STAMP)
    assert started is not None
    assert started["phase"] == "Progressing" and started["weight"] == 10
    assert started["revision"] == revision_of(new, new_spec)
    assert started["stableRevision"] == revision_of(old, old_spec)
    out = objects(new, plan)
    stable, canary = out["Deployment/chat-engine"], out["Deployment/chat-engine-canary"]
    assert "--max-num-seqs" not in args(stable) and "--max-num-seqs" in args(canary)
    assert stable["spec"]["replicas"] == 4 and canary["spec"]["replicas"] == 1  # ceil(4 * 10%)
    assert canary["spec"]["selector"]["matchLabels"]["kvpilot.io/track"] == "canary"
    table = routes(new, new_spec, plan)
    assert table["revisions"] == [
        {"name": started["stableRevision"], "weight": 90, "role": "stable"},
        {"name": started["revision"], "weight": 10, "role": "canary"},
    ]
    assert ROUTES_KEY in out["ConfigMap/chat-router"]["data"]

    # Next reconciles follow status.canary: the weight the controller set...
    at_50 = {**started, "step": 1, "weight": 50}
    plan, again = plan_rollout(new, new_spec, live_stable, at_50, STAMP)
    assert again is None and plan.canary_weight == 50
    assert objects(new, plan)["Deployment/chat-engine-canary"]["spec"]["replicas"] == 2
    # ...a promotion: the stable Deployment takes the new revision, all traffic on it...
    promoting = {**started, "phase": "Promoting", "weight": 100}
    plan, _ = plan_rollout(new, new_spec, live_stable, promoting, STAMP)
    out = objects(new, plan)
    assert "--max-num-seqs" in args(out["Deployment/chat-engine"])
    assert "Deployment/chat-engine-canary" in out
    assert [r["weight"] for r in routes(new, new_spec, plan)["revisions"]] == [100]
    # ...and once the controller saw the stable Deployment run it (Promoted), the canary goes.
    promoted_stable = objects(new, plan)["Deployment/chat-engine"]
    plan, _ = plan_rollout(new, new_spec, promoted_stable, promoting, STAMP)
    assert "Deployment/chat-engine-canary" in objects(new, plan)
    promoted = {**promoting, "phase": "Promoted"}
    plan, again = plan_rollout(new, new_spec, promoted_stable, promoted, STAMP)
    assert again is None and "Deployment/chat-engine-canary" not in objects(new, plan)
    # A rolled-back canary stays down until the spec changes again.
    rolled_back = {**started, "phase": "RolledBack", "weight": 0}
    plan, again = plan_rollout(new, new_spec, live_stable, rolled_back, STAMP)
    assert again is None and plan.canary is None
    assert "--max-num-seqs" not in args(objects(new, plan)["Deployment/chat-engine"])
    newer = service(rollout=CANARY, replicas=4, engine={"maxNumSeqs": 16})
    _, restarted = plan_rollout(
        newer, resolve_spec(newer.spec, None), live_stable, rolled_back, STAMP
    )
    assert restarted is not None and restarted["phase"] == "Progressing"


def test_without_a_canary_the_engines_update_in_place() -> None:
    old = service()
    live_stable = objects(old)["Deployment/chat-engine"]
    new = service(engine={"maxNumSeqs": 8})
    plan, started = plan_rollout(new, resolve_spec(new.spec, None), live_stable, None, STAMP)
    assert started is None and plan.canary is None
    assert "--max-num-seqs" in args(objects(new, plan)["Deployment/chat-engine"])


def test_shadow_is_its_own_revision_and_never_an_engine_series() -> None:
    svc = service(rollout={"shadow": {"mirrorPercent": 25, "maxRps": 3}})
    spec = resolve_spec(svc.spec, None)
    out = objects(svc)
    shadow = out["Deployment/chat-engine-shadow"]
    labels = shadow["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "shadow"
    assert labels["kvpilot.io/llmservice"] == "chat"
    # Identical settings, yet a distinct revision: the router never mixes it with the primary.
    table = routes(svc, spec, Plan(stable=spec))
    assert table["shadow"]["revision"] == labels[REVISION_LABEL]
    assert table["shadow"]["revision"] != table["revisions"][0]["name"]
    assert table["shadow"] | {"revision": ""} == {
        "revision": "",
        "mirrorPercent": 25.0,
        "maxRps": 3.0,
    }
    assert 'component!~"shadow|router"' in ENGINE_SERIES
    # Only the shadow's replicas, never the autoscaler's.
    assert shadow["spec"]["replicas"] == 1
    # A shadow with another model has it in its args.
    other = service(rollout={"shadow": {"engine": {"maxNumSeqs": 4}}})
    assert "--max-num-seqs" in args(objects(other)["Deployment/chat-engine-shadow"])
    assert "--max-num-seqs" not in args(objects(other)["Deployment/chat-engine"])


def test_router_objects_grant_only_what_the_router_reads() -> None:
    svc = service(router={"replicas": 2, "apiKeySecret": "chat-keys", "prefixChars": 128})
    out = objects(svc)
    router = out["Deployment/chat-router"]
    pod = router["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert router["spec"]["replicas"] == 2
    assert container["args"][:1] == ["router"]
    assert container["args"][5:9] == ["--namespace", "ns", "--service", "chat"]
    assert container["args"][-2:] == ["--prefix-chars", "128"]
    assert pod["serviceAccountName"] == "chat-router"
    key = next(e for e in container["env"] if e["name"] == "KVPILOT_API_KEY")
    assert key["valueFrom"]["secretKeyRef"] == {"name": "chat-keys", "key": "api-key"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    rules = out["Role/chat-router"]["rules"]
    assert rules == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["chat-router"],
            "verbs": ["list", "watch"],
        },
    ]
    assert out["RoleBinding/chat-router"]["subjects"][0]["name"] == "chat-router"
    assert out["Service/chat"]["spec"]["selector"]["app.kubernetes.io/component"] == "router"


def progressing(step: int = 0, weight: int = 10, **kw: Any) -> CanaryStatus:
    return CanaryStatus(
        revision="c" * 10,
        stable_revision="s" * 10,
        phase="Progressing",
        step=step,
        weight=weight,
        step_started_at=STAMP,
        **kw,
    )


def analysis(**kw: Any) -> CanaryAnalysis:
    base = dict(
        canary_requests=50,
        stable_requests=400,
        canary_ttft_p95_ms=40.0,
        stable_ttft_p95_ms=38.0,
        canary_tpot_p95_ms=20.0,
        stable_tpot_p95_ms=21.0,
        canary_error_rate=0.0,
        stable_error_rate=0.0,
    )
    return CanaryAnalysis(**{**base, **kw})


CFG = CanarySpec(steps=[10, 50, 100], step_seconds=30)
LATER = T0 + dt.timedelta(seconds=31)


def test_canary_waits_for_its_step_then_walks_the_weights_and_promotes() -> None:
    cs = progressing()
    same, events = advance_canary(CFG, cs, analysis(), T0 + dt.timedelta(seconds=10))
    assert same == cs and events == []
    cs, events = advance_canary(CFG, cs, analysis(), LATER)
    assert (cs.phase, cs.step, cs.weight, cs.verdict) == ("Progressing", 1, 50, "Pass")
    assert events[0][:2] == ("Normal", "CanaryStep") and "now gets 50%" in events[0][2]
    cs = cs.model_copy(update={"step_started_at": STAMP})
    cs, _ = advance_canary(CFG, cs, analysis(), LATER)
    assert cs.weight == 100
    # At 100% the stable revision has no traffic: the last step's stable figures are the baseline.
    cs = cs.model_copy(update={"step_started_at": STAMP})
    blind = analysis(stable_ttft_p95_ms=None, stable_tpot_p95_ms=None, stable_requests=0)
    cs, events = advance_canary(CFG, cs, blind, LATER)
    assert cs.phase == "Promoting" and events[0][1] == "CanaryPromoting"
    assert cs.analysis is not None and cs.analysis.stable_ttft_p95_ms == 38.0
    waiting, events = advance_canary(CFG, cs, None, LATER, stable_rolled_out=False)
    assert waiting.phase == "Promoting" and events == []
    done, events = advance_canary(CFG, cs, None, LATER, stable_rolled_out=True)
    assert done.phase == "Promoted" and events[0][1] == "CanaryPromoted"


def test_canary_rolls_back_on_a_latency_or_error_regression() -> None:
    for bad, what in (
        (analysis(canary_tpot_p95_ms=120.0), "TPOT"),
        (analysis(canary_ttft_p95_ms=400.0), "TTFT"),
        (analysis(canary_error_rate=0.2), "error rate"),
    ):
        cs, events = advance_canary(CFG, progressing(), bad, LATER)
        assert (cs.phase, cs.weight, cs.verdict) == ("RolledBack", 0, "Fail")
        assert cs.reasons is not None and cs.reasons[0].startswith(what)
        assert events[0][:2] == ("Warning", "CanaryRolledBack")
    # Within the allowed regression, or under the noise floor: passes.
    assert judge(CFG, analysis(canary_tpot_p95_ms=25.0))[0] == "Pass"  # +19%
    assert judge(CFG, analysis(canary_tpot_p95_ms=2.0, stable_tpot_p95_ms=1.0))[0] == "Pass"


def test_the_step_clock_waits_for_a_ready_canary_engine() -> None:
    cs, events = advance_canary(CFG, progressing(), None, LATER, canary_ready=False)
    assert (cs.phase, cs.weight, cs.verdict, events) == ("Progressing", 10, "Pending", [])
    assert cs.step_started_at == LATER.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert cs.reasons is not None and "not ready" in cs.reasons[0]


def test_canary_without_enough_traffic_or_data_waits() -> None:
    cs, events = advance_canary(CFG, progressing(), analysis(canary_requests=3), LATER)
    assert (cs.phase, cs.weight, cs.verdict) == ("Progressing", 10, "Inconclusive")
    assert events[0][1] == "CanaryInconclusive"
    again, events = advance_canary(
        CFG, cs.model_copy(update={"step_started_at": STAMP}), None, LATER, unavailable="down"
    )
    assert again.verdict == "Inconclusive" and again.reasons == ["down"] and events == []


def test_stable_runs_only_when_rolled_out_on_the_revision() -> None:
    dep = {
        "metadata": {"generation": 3},
        "spec": {"replicas": 2, "template": {"metadata": {"labels": {REVISION_LABEL: "r1"}}}},
        "status": {
            "observedGeneration": 3,
            "updatedReplicas": 2,
            "availableReplicas": 2,
            "replicas": 2,
        },
    }
    assert stable_runs(dep, "r1") and not stable_runs(dep, "r2")
    assert not stable_runs({**dep, "status": {**dep["status"], "replicas": 3}}, "r1")
    assert not stable_runs({**dep, "status": {**dep["status"], "observedGeneration": 2}}, "r1")


def test_shadow_condition() -> None:
    from kvpilot_operator.api.types import ShadowStatus

    ok = ShadowStatus(revision="x", mirrored=40, errors=1, greedy_agreement=1.0)
    assert shadow_condition(ok, None)["status"] == "True"
    assert "100.0%" in shadow_condition(ok, None)["message"]
    bad = ShadowStatus(revision="x", mirrored=40, errors=10)
    assert shadow_condition(bad, None)["reason"] == "ShadowErrors"
    assert shadow_condition(None, "down")["status"] == "Unknown"
    idle = ShadowStatus(revision="x")
    assert shadow_condition(idle, None)["reason"] == "NoMirroredTraffic"


def test_a_canary_whose_rollout_block_is_removed_leaves_no_stale_status() -> None:
    from kvpilot_operator.controller.status import status_patch
    from kvpilot_operator.rollout.plan import abandoned

    in_flight = {"canary": progressing().model_dump(mode="json", by_alias=True)}
    without = resolve_spec(service().spec, None)
    assert abandoned(without, in_flight)
    assert not abandoned(resolve_spec(service(rollout=CANARY).spec, None), in_flight)
    done = {"canary": {**in_flight["canary"], "phase": "Promoted"}}
    assert not abandoned(without, done)  # history of a finished canary stays
    patch = status_patch(
        in_flight,
        deployment=None,
        generation=1,
        problem=None,
        selector="s",
        endpoint="e",
        model="m",
        extra={"canary": None},
    )
    assert patch is not None and patch["canary"] is None  # merge patch: removes the field
