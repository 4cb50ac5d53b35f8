"""spec.adapters without a cluster: the engine args (parsed by the real `kvpilot serve` parser),
the download init containers and their credentials, the mounts, the router's adapter routes,
and which changes roll the engines."""

from __future__ import annotations

import json
from typing import Any

from kvpilot_engine.cli import build_parser
from kvpilot_operator.api.policies import resolve_spec
from kvpilot_operator.api.types import LLMService
from kvpilot_operator.controller.manifests import (
    Plan,
    SpecError,
    adapter_variants,
    cache_dir,
    render,
    revision_of,
)

SQL = {
    "name": "sql",
    "source": {
        "uri": "s3://adapters/sql-v1",
        "secretName": "s3-creds",
        "endpoint": "http://m:9000",
    },
}
SUPPORT = {"name": "support", "servedName": "help", "source": {"uri": "hf://acme/support-lora"}}


def service(adapters: list[dict[str, Any]], **spec: Any) -> LLMService:
    body = {"model": {"source": {"path": "smollm2"}}, "adapters": adapters, **spec}
    return LLMService.model_validate(
        {"metadata": {"name": "chat", "namespace": "team-a", "uid": "u-1"}, "spec": body}
    )


def objects(svc: LLMService, plan_weights: dict[str, int] | None = None) -> list[dict[str, Any]]:
    spec = resolve_spec(svc.spec, None)
    plan = Plan(stable=spec, adapter_canary=plan_weights or {})
    return render(svc, spec, plan=plan)


def engine(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(o for o in objs if o["kind"] == "Deployment")["spec"]["template"]["spec"]


def routes(objs: list[dict[str, Any]]) -> dict[str, Any]:
    cm = next(o for o in objs if o["kind"] == "ConfigMap")
    return json.loads(cm["data"]["routes.json"])


def test_adapters_are_engine_args_downloaded_by_init_containers_with_their_own_credentials() -> (
    None
):
    svc = service([SQL, SUPPORT], engine={"maxLoras": 2, "maxLoraRank": 32, "maxCpuLoras": 4})
    pod = engine(objects(svc))
    container = pod["containers"][0]
    ns = build_parser().parse_args(["serve", *container["args"]])
    assert ns.enable_lora and (ns.max_loras, ns.max_lora_rank, ns.max_cpu_loras) == (2, 32, 4)
    assert not ns.allow_runtime_lora_updating  # nothing to load later
    sql_dir, support_dir = cache_dir("s3://adapters/sql-v1"), cache_dir("hf://acme/support-lora")
    assert ns.lora_modules == [f"sql={sql_dir}", f"help={support_dir}"]
    assert ns.served_model_name == "chat"

    inits = {c["name"]: c for c in pod["initContainers"]}
    assert set(inits) == {"adapter-sql", "adapter-support"}
    assert inits["adapter-sql"]["args"][:2] == ["s3://adapters/sql-v1", sql_dir]
    assert inits["adapter-support"]["args"][:2] == ["hf://acme/support-lora", support_dir]
    sql_env = {e["name"]: e for e in inits["adapter-sql"]["env"]}
    assert sql_env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    assert sql_env["AWS_ENDPOINT_URL"]["value"] == "http://m:9000"
    # Credentials go to the adapter's own download only: not to the other's, not to the engine.
    assert "valueFrom" not in json.dumps(inits["adapter-support"]["env"])
    assert "s3-creds" not in json.dumps(container)
    # One cache: the init containers write into it, the engine reads it.
    cache_mounts = [m for m in container["volumeMounts"] if m["name"] == "model-cache"]
    assert cache_mounts == [{"name": "model-cache", "mountPath": "/model-cache", "readOnly": True}]
    assert [v for v in pod["volumes"] if v["name"] == "model-cache"] == [
        {"name": "model-cache", "emptyDir": {}}
    ]


def test_no_adapters_no_lora_flags_and_routes_as_before() -> None:
    svc = service([], engine={"maxLoras": 2})
    objs = objects(svc)
    assert "--enable-lora" not in engine(objs)["containers"][0]["args"]
    assert "initContainers" not in engine(objs)
    assert "adapters" not in routes(objs)


def test_adapters_on_claims_are_mounted_once_and_paths_kept() -> None:
    same = {"name": "a", "source": {"pvc": {"claimName": "weights"}, "path": "loras/a"}}
    other = {"name": "b", "source": {"uri": "pvc://loras/team/b"}}
    inside = {"name": "c", "source": {"path": "/opt/loras/c"}}
    svc = service(
        [same, other, inside], model={"source": {"pvc": {"claimName": "weights"}, "path": "m"}}
    )
    pod = engine(objects(svc))
    ns = build_parser().parse_args(["serve", *pod["containers"][0]["args"]])
    assert ns.lora_modules == ["a=/models/loras/a", "b=/adapters/loras/team/b", "c=/opt/loras/c"]
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert sorted(claims) == ["loras", "weights"]
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/adapters/loras"]["readOnly"] is True
    assert "initContainers" not in pod  # nothing to download


def test_canary_and_shadow_are_loaded_beside_the_adapter_and_weighted_in_the_routes() -> None:
    sql = {
        **SQL,
        "canary": {"source": {"uri": "s3://adapters/sql-v2", "secretName": "s3-creds"}},
        "shadow": {"source": {"path": "/opt/loras/sql-v3"}, "mirrorPercent": 20},
    }
    objs = objects(service([sql, SUPPORT]), {"sql": 25})
    pod = engine(objs)
    ns = build_parser().parse_args(["serve", *pod["containers"][0]["args"]])
    v1, v2 = cache_dir("s3://adapters/sql-v1"), cache_dir("s3://adapters/sql-v2")
    # The new versions are downloaded with the rest, and loaded by the router on first use.
    assert ns.lora_modules == [f"sql={v1}", f"help={cache_dir('hf://acme/support-lora')}"]
    assert ns.allow_runtime_lora_updating
    assert [c["name"] for c in pod["initContainers"]] == [
        "adapter-sql",
        "adapter-sql-canary",
        "adapter-support",
    ]
    table = routes(objs)["adapters"]
    assert table[0] == {
        "name": "sql",
        "variants": [
            {"path": v1, "weight": 75, "role": "stable"},
            {"path": v2, "weight": 25, "role": "canary"},
        ],
        "shadow": {"path": "/opt/loras/sql-v3", "mirrorPercent": 20.0, "maxRps": None},
    }
    assert table[1]["name"] == "help" and table[1]["variants"][0]["weight"] == 100


def test_adapter_changes_roll_the_engines_in_place_not_as_a_model_canary() -> None:
    before = service([SQL])
    after = service([{**SQL, "source": {"uri": "s3://adapters/sql-v2"}}, SUPPORT])
    spec_before, spec_after = resolve_spec(before.spec, None), resolve_spec(after.spec, None)
    # The model's revision is the same (no model canary starts) ...
    assert revision_of(before, spec_before) == revision_of(after, spec_after)
    # ... while the pods change, so the Deployment rolls its engines (surge first).
    assert engine(objects(before)) != engine(objects(after))
    assert [v.role for v in adapter_variants(spec_after)] == ["stable", "stable"]


def test_an_adapter_served_as_the_model_is_refused() -> None:
    svc = service([{"name": "chat", "source": {"path": "/opt/loras/x"}}])
    try:
        objects(svc)
    except SpecError as e:
        assert "spec.adapters[0].servedName" in str(e)
    else:
        raise AssertionError("accepted")
