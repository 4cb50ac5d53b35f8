"""spec.speculative, without a cluster: the `--speculative-config` the operator renders is what
`kvpilot serve` parses into the engine's SpeculativeConfig, a policy supplies it and a service
overrides or turns it off, a draft model's source gets its own download or mount, and an engine
that refuses the draft (a different tokenizer) is reported naming spec.speculative, and the
autoscaler's capacity model counts rejected drafts as work."""

from __future__ import annotations

import json
from typing import Any

from kvpilot_engine.cli import build_parser, engine_args_from
from kvpilot_engine.spec_decode.config import METHODS, SpeculativeConfig
from kvpilot_operator.api.policies import load_presets, resolve_spec
from kvpilot_operator.api.types import SPECULATIVE_METHODS, LLMService
from kvpilot_operator.autoscaler.decision import (
    Observation,
    ScalerState,
    ScalingParams,
    Window,
    decide,
)
from kvpilot_operator.controller.manifests import (
    DRAFT_DOWNLOAD_CONTAINER,
    RenderOptions,
    render,
    revision_of,
)
from kvpilot_operator.controller.status import engine_failure


def make_service(**spec: Any) -> LLMService:
    body = {"model": {"source": {"path": "smollm2"}}, **spec}
    return LLMService.model_validate(
        {"metadata": {"name": "code", "namespace": "team-a", "uid": "u-1"}, "spec": body}
    )


def engine_pod(svc: LLMService, policy: str | None = None) -> dict[str, Any]:
    presets = load_presets()
    spec = resolve_spec(svc.spec, presets[policy].spec if policy else None)
    deployment = render(svc, spec, RenderOptions())[0]
    assert deployment["kind"] == "Deployment"
    return deployment["spec"]["template"]["spec"]


def engine_config(pod: dict[str, Any]) -> SpeculativeConfig | None:
    """The rendered args through `kvpilot serve`'s own parser into the engine's config."""
    args = pod["containers"][0]["args"]
    return engine_args_from(build_parser().parse_args(["serve", *args])).speculative_config


def test_methods_are_the_engines() -> None:
    assert SPECULATIVE_METHODS == METHODS


def test_fields_become_the_engines_config_with_vllm_keys() -> None:
    svc = make_service(
        speculative={
            "method": "suffix",
            "numSpeculativeTokens": 3,
            "promptLookupMin": 1,
            "promptLookupMax": 6,
            "suffixCacheRequests": 16,
            "disableByBatchSize": 4,
            "adaptive": False,
        }
    )
    pod = engine_pod(svc)
    args = pod["containers"][0]["args"]
    raw = json.loads(args[args.index("--speculative-config") + 1])
    assert raw == {
        "method": "suffix",
        "num_speculative_tokens": 3,
        "prompt_lookup_min": 1,
        "prompt_lookup_max": 6,
        "suffix_cache_requests": 16,
        "disable_by_batch_size": 4,
        "adaptive": False,
    }
    assert engine_config(pod) == SpeculativeConfig(**raw)
    # Unset keys stay the engine's defaults.
    assert engine_config(engine_pod(make_service(speculative={}))) == SpeculativeConfig()
    assert engine_config(engine_pod(make_service())) is None


def test_copilot_turns_it_on_and_a_service_overrides_or_opts_out() -> None:
    on = engine_config(engine_pod(make_service(), "copilot"))
    assert on is not None and on.method == "ngram" and on.adaptive
    assert on.num_speculative_tokens == 5
    mine = engine_config(
        engine_pod(make_service(speculative={"numSpeculativeTokens": 2}), "copilot")
    )
    assert mine is not None and (mine.method, mine.num_speculative_tokens) == ("ngram", 2)
    off = engine_pod(make_service(speculative={"enabled": False}), "copilot")
    assert "--speculative-config" not in off["containers"][0]["args"]
    assert (
        engine_pod(make_service(), "interactive-chat")["containers"][0]["args"].count(
            "--speculative-config"
        )
        == 0
    )


def test_a_downloaded_draft_gets_its_own_init_container() -> None:
    svc = make_service(
        model={"source": {"uri": "hf://org/big", "secretName": "hf"}},
        speculative={
            "numSpeculativeTokens": 4,
            "draftModel": {"source": {"uri": "s3://drafts/small", "secretName": "s3-creds"}},
        },
    )
    pod = engine_pod(svc)
    inits = {c["name"]: c for c in pod["initContainers"]}
    draft = inits[DRAFT_DOWNLOAD_CONTAINER]
    assert draft["args"][0] == "s3://drafts/small"
    env = {e["name"]: e for e in draft["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    assert "HF_TOKEN" not in env  # each download has its own source's credentials
    config = engine_config(pod)
    # method inferred from the draft (as vLLM does from `model`), the draft's download folder.
    assert config is not None and config.method == "draft_model"
    assert config.model == draft["args"][1]
    assert config.model != inits["model-download"]["args"][1]
    mounts = {m["name"] for m in pod["containers"][0]["volumeMounts"]}
    assert "model-cache" in mounts
    # A different draft is a different revision (a rollout), as a different model is.
    spec = resolve_spec(svc.spec, None)
    other = spec.model_copy(deep=True)
    assert other.speculative is not None and other.speculative.draft_model is not None
    other.speculative.draft_model.source.uri = "s3://drafts/smaller"
    assert revision_of(svc, spec) != revision_of(svc, other)


def test_a_draft_on_a_claim_is_mounted() -> None:
    own = engine_pod(
        make_service(
            speculative={
                "method": "draft_model",
                "draftModel": {"source": {"uri": "pvc://drafts/s"}},
            }
        )
    )
    volumes = {v["name"]: v for v in own["volumes"]}
    assert volumes["draft-models"]["persistentVolumeClaim"] == {
        "claimName": "drafts",
        "readOnly": True,
    }
    assert (config := engine_config(own)) is not None and config.model == "/draft-models/s"
    assert "initContainers" not in own
    # The served model's own claim: mounted once.
    shared = engine_pod(
        make_service(
            model={"source": {"pvc": {"claimName": "weights"}, "path": "llama/8b"}},
            speculative={
                "draftModel": {"source": {"pvc": {"claimName": "weights"}, "path": "l/1b"}}
            },
        )
    )
    assert "draft-models" not in {v["name"] for v in shared["volumes"]}
    assert (config := engine_config(shared)) is not None and config.model == "/models/l/1b"


def test_an_engine_refusing_the_draft_is_reported_naming_the_field() -> None:
    # What the kubelet records for `kvpilot serve` exiting on a draft of another tokenizer (the
    # engine's last log line, FallbackToLogsOnError); the cluster test runs the real engine.
    line = json.dumps(
        {
            "event": "engine failed to start",
            "error": "speculative_config.model '/draft-models/s' does not share the target "
            "model's tokenizer (vocabulary size or tokenization differ)",
        }
    )
    pod = {
        "metadata": {"name": "code-engine-1"},
        "status": {
            "containerStatuses": [
                {
                    "name": "engine",
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {"terminated": {"exitCode": 1, "message": line + "\n"}},
                }
            ]
        },
    }
    message = engine_failure([pod])
    assert message is not None
    assert "spec.speculative: speculative_config.model" in message
    assert "does not share the target model's tokenizer" in message


def test_capacity_counts_rejected_drafts_as_work() -> None:
    """The step-time fit counts verified drafts as step tokens; rejected ones serve nothing, so
    a replica's capacity in served tokens shrinks by 1 + rejected drafts per served token."""
    params = ScalingParams()
    base = dict(
        request_rate=5.0,
        token_rate=3500.0,
        tokens_per_request=700.0,
        ttft=0.1,
        tpot=0.02,
        step_time=0.015,
        step_tokens=50.0,
    )
    plain = Window(**base)  # type: ignore[arg-type]
    # 1,000 drafts/s verified, 300 accepted: 700 rejected per 3,500 served tokens.
    spec = Window(**base, draft_rate=1000.0, accepted_rate=300.0)  # type: ignore[arg-type]
    assert spec.rejected_share == 0.2 and plain.rejected_share == 0.0
    d_plain, _ = decide(params, ScalerState(), Observation(0, 2, 2, plain, plain))
    d_spec, _ = decide(params, ScalerState(), Observation(0, 2, 2, spec, spec))
    assert d_plain.capacity is not None and d_spec.capacity is not None
    assert abs(d_spec.capacity * 1.2 - d_plain.capacity) < 1e-6 * d_plain.capacity
    assert d_spec.required is not None and d_plain.required is not None
    assert d_spec.required > d_plain.required
    assert d_spec.details["spec_rejected_share"] == 0.2
    assert "spec_rejected_share" not in d_plain.details
