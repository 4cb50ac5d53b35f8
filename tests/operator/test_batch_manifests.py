"""spec.batch on an LLMService: the router it renders serves the Batch API from a volume, with
flags the real `kvpilot router` parser takes; a policy can switch it on; bad values name the
field."""

from __future__ import annotations

from typing import Any

import pytest
from kvpilot_engine.cli import build_parser
from kvpilot_operator.api.policies import resolve_spec
from kvpilot_operator.api.types import LLMService, ServingPolicySpec
from kvpilot_operator.controller.manifests import RenderOptions, render
from kvpilot_operator.router.batch.api import batch_settings
from pydantic import ValidationError


def _router(spec: dict[str, Any], policy: dict[str, Any] | None = None) -> dict[str, Any]:
    svc = LLMService.model_validate(
        {
            "metadata": {"name": "jobs", "namespace": "team-a", "uid": "u-1"},
            "spec": {"model": {"source": {"path": "smollm2"}}, **spec},
        }
    )
    pol = ServingPolicySpec.model_validate(policy) if policy else None
    objs = render(svc, resolve_spec(svc.spec, pol), RenderOptions())
    (router,) = [
        o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-router")
    ]
    return router["spec"]["template"]["spec"]


def test_batch_router_args_and_volume() -> None:
    pod = _router(
        {
            "batch": {
                "enabled": True,
                "storage": {"claimName": "batch-store"},
                "maxFileBytes": 5_000_000,
                "maxConcurrentRequests": 8,
            }
        }
    )
    (container,) = pod["containers"]
    ns = build_parser().parse_args(container["args"])  # the router's own parser
    settings = batch_settings(ns)
    assert settings is not None
    assert (settings.max_file_bytes, settings.max_in_flight) == (5_000_000, 8)
    assert pod["volumes"] == [
        {"name": "batch", "persistentVolumeClaim": {"claimName": "batch-store"}}
    ]
    assert container["volumeMounts"] == [{"name": "batch", "mountPath": settings.directory}]

    # The service's SLO goes with it: batch admission holds interactive latency under it.
    pod = _router(
        {
            "batch": {"enabled": True},
            "slo": {
                "ttft": {"percentile": 90, "targetMs": 400},
                "tpot": {"percentile": 99, "targetMs": 80},
            },
        }
    )
    slo = batch_settings(build_parser().parse_args(pod["containers"][0]["args"])).slo
    assert (slo.ttft_s, slo.tpot_s, slo.percentile) == (0.4, 0.08, 99)

    # Without a claim: an emptyDir (the root filesystem is read-only); defaults for the rest.
    pod = _router({"batch": {"enabled": True}})
    ns = build_parser().parse_args(pod["containers"][0]["args"])
    assert batch_settings(ns) is not None and ns.batch_max_in_flight == 16
    assert batch_settings(ns).slo.any  # the default SLO, as the autoscaler holds it
    assert pod["volumes"] == [{"name": "batch", "emptyDir": {}}]

    # Off, or not asked for: no flags, no volume. A policy can switch it on; the service wins.
    for spec in ({}, {"batch": {"enabled": False}}):
        pod = _router(spec)
        assert "--batch-dir" not in pod["containers"][0]["args"] and "volumes" not in pod
    assert "--batch-dir" in _router({}, {"batch": {"enabled": True}})["containers"][0]["args"]
    off = _router({"batch": {"enabled": False}}, {"batch": {"enabled": True}})
    assert "--batch-dir" not in off["containers"][0]["args"]


@pytest.mark.parametrize(
    ("batch", "field"),
    [
        ({"enabled": "maybe"}, "enabled"),
        ({"enabled": True, "maxConcurrentRequests": 0}, "maxConcurrentRequests"),
        ({"enabled": True, "maxFileBytes": -1}, "maxFileBytes"),
        ({"enabled": True, "storage": {"claimName": "Not_A_Name"}}, "claimName"),
        ({"enabled": True, "bogus": 1}, "bogus"),
    ],
)
def test_bad_batch_fields_are_named(batch: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as e:
        _router({"batch": batch})
    assert field in str(e.value)
