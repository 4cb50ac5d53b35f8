"""Adapter canaries: a new version of a LoRA adapter beside the current one on the same engines.

Pure, as the model canary's plan and step are: `plan_adapters` (the resolved spec and
status.adapters -> each canary's share of its adapter's requests, and status.adapters to record)
for the reconcile, which renders the shares into the router's routes; `advance_adapters` (one
evaluation: each canary judged by `canary.advance_canary` on the routers' per-adapter series) for
the rollout controller. A version is known by its folder on the engines, so status.adapters'
`revision` and `stableRevision` are those folders' hashes: a new source is a new canary.

A promoted canary takes all of its adapter's requests until the spec's `source` is set to the
canary's (then the engines restart with it as the adapter, and the router finds it there by the
same folder); a rolled-back one gets none until its source changes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

from pydantic import ValidationError

from kvpilot_operator.api.types import (
    AdapterStatus,
    CanaryAnalysis,
    CanaryStatus,
    LLMServiceSpec,
    ShadowStatus,
)
from kvpilot_operator.controller.manifests import adapter_variants
from kvpilot_operator.rollout.canary import Event, advance_canary

# What each phase gives the canary of its adapter's requests (Progressing: its step's weight).
_PHASE_WEIGHT = {"Promoting": 100, "Promoted": 100, "RolledBack": 0}


def version_of(path: str) -> str:
    return hashlib.sha256(path.encode()).hexdigest()[:10]


def _versions(spec: LLMServiceSpec) -> dict[str, tuple[str, str | None]]:
    """Adapter name -> (stable version, canary version or None)."""
    out: dict[str, tuple[str, str | None]] = {}
    for v in adapter_variants(spec):
        stable, canary = out.get(v.adapter, ("", None))
        if v.role == "stable":
            stable = version_of(v.path)
        elif v.role == "canary":
            canary = version_of(v.path)
        out[v.adapter] = (stable, canary)
    return out


def _parse(statuses: list[dict[str, Any]] | None) -> dict[str, AdapterStatus]:
    out = {}
    for raw in statuses or []:
        try:
            st = AdapterStatus.model_validate(raw)
        except ValidationError:
            continue
        out[st.name] = st
    return out


def plan_adapters(
    spec: LLMServiceSpec, statuses: list[dict[str, Any]] | None, now: str
) -> tuple[dict[str, int], list[dict[str, Any]] | None, bool]:
    """Each adapter canary's share (percent of its adapter's requests), status.adapters as it
    should be (a canary of a new version starts at its first step, one whose version is gone
    from the spec is forgotten, as are a removed shadow's figures), and whether that is news
    (else the status is the rollout controller's to move on: a reconcile that read it a moment
    ago must not write it back)."""
    current = _parse(statuses)
    versions = _versions(spec)
    weights: dict[str, int] = {}
    out: list[dict[str, Any]] = []
    for a in spec.adapters or []:
        known = current.get(a.name)
        shadow = known.shadow if known is not None and a.shadow is not None else None
        if a.canary is None:
            if shadow is not None:  # the shadow's figures, kept for the controller to renew
                out.append(_dump(AdapterStatus(name=a.name, shadow=shadow)))
            continue
        stable, canary = versions[a.name]
        assert canary is not None
        cs = known.canary if known is not None else None
        if cs is None or (cs.revision, cs.stable_revision) != (canary, stable):
            cs = CanaryStatus(
                revision=canary,
                stable_revision=stable,
                phase="Progressing",
                step=0,
                weight=a.canary.steps[0],
                step_started_at=now,
                reasons=[f"adapter {a.name}: canary {canary} started beside {stable}"],
            )
        weights[a.name] = _PHASE_WEIGHT.get(cs.phase, cs.weight)
        out.append(_dump(AdapterStatus(name=a.name, canary=cs, shadow=shadow)))

    def started(entries: list[dict[str, Any]] | None) -> set[tuple[Any, ...]]:
        """What the plan decides: which canaries run (by versions), which shadows have figures
        (a shadow taken out of the spec drops its entry: no loop would renew it then)."""
        out: set[tuple[Any, ...]] = set()
        for e in entries or []:
            if not isinstance(e, dict):
                continue
            canary = e.get("canary")
            if isinstance(canary, dict) and {"revision", "stableRevision"} <= set(canary):
                out.add((e.get("name"), canary["revision"], canary["stableRevision"]))
            if e.get("shadow") is not None:
                out.add((e.get("name"), "shadow"))
        return out

    return weights, out or None, started(out) != started(statuses)


def advance_adapters(
    spec: LLMServiceSpec,
    statuses: list[dict[str, Any]] | None,
    analyses: dict[str, tuple[CanaryAnalysis | None, str | None]],
    now: dt.datetime,
) -> tuple[list[dict[str, Any]] | None, list[Event]]:
    """status.adapters after one evaluation (`analyses`: each adapter's comparison, or None and
    why not), and the events to post (reasons prefixed Adapter, messages naming the adapter).
    A promotion needs no engine to roll (both versions are on every engine): Promoting becomes
    Promoted at the next evaluation."""
    current = _parse(statuses)
    events: list[Event] = []
    stepped: dict[str, dict[str, Any]] = {}
    for a in spec.adapters or []:
        known = current.get(a.name)
        if a.canary is None or known is None or known.canary is None:
            continue
        analysis, unavailable = analyses.get(a.name, (None, "not evaluated"))
        new, evs = advance_canary(
            a.canary,
            known.canary,
            analysis,
            now,
            stable_rolled_out=True,
            unavailable=unavailable,
        )
        for kind, reason, message in evs:
            if reason == "CanaryPromoted":
                message = (
                    f"version {new.revision} serves all of its requests; set its source to "
                    "the canary's and remove canary to free the old version"
                )
            events.append((kind, f"Adapter{reason}", f"adapter {a.name}: {message}"))
        stepped[a.name] = _dump(AdapterStatus(name=a.name, canary=new, shadow=known.shadow))
    # In their order; entries the step does not touch (a shadow's alone) stay as they are.
    out = [stepped.get(e.get("name", ""), e) for e in statuses or []]
    return out or None, events


def with_shadows(
    spec: LLMServiceSpec,
    statuses: list[dict[str, Any]] | None,
    summaries: dict[str, ShadowStatus],
) -> list[dict[str, Any]] | None:
    """status.adapters with each adapter shadow's latest figures (by adapter name)."""
    current = _parse(statuses)
    out = []
    for a in spec.adapters or []:
        known = current.get(a.name) or AdapterStatus(name=a.name)
        if a.shadow is not None and a.name in summaries:
            known = known.model_copy(update={"shadow": summaries[a.name]})
        if known.canary is not None or (a.shadow is not None and known.shadow is not None):
            out.append(_dump(known))
    return out or None


def _dump(status: AdapterStatus) -> dict[str, Any]:
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)


def evaluated(spec: LLMServiceSpec, statuses: list[dict[str, Any]] | None) -> list[str]:
    """The adapters whose canary an evaluation moves on (Progressing or Promoting)."""
    current = _parse(statuses)
    return [
        a.name
        for a in spec.adapters or []
        if a.canary is not None
        and (st := current.get(a.name)) is not None
        and st.canary is not None
        and st.canary.phase in ("Progressing", "Promoting")
    ]
