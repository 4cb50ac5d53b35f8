"""LoRA adapters: which engines hold which adapter version, and which version a request gets.

An engine's adapters are read from its own /v1/models (discovery), each card's `root` being the
folder it was loaded from: that folder names a version wherever it is loaded and under whatever
name (the operator downloads each source to a folder of its own), so a canary promoted by a
rolling update is still found on the old engines (as `sql@canary`) and the new (as `sql`).

Per request: the `model` names the base model, an adapter, or nothing known (404 here rather
than a trip to an engine). An adapter with versions in the routes (spec.adapters' canaries) gets
one by smooth weighted round robin over the versions' shares; then an engine that holds it, by
bounded-load consistent hashing on the adapter's name (as prefix affinity hashes the prompt), so
an adapter's requests share an engine's adapter slots and prefix cache until that engine has
more than its share, and spill over to the next one on the ring. When every holder is over its
bound and an engine without the adapter is not, that engine is asked to load it at runtime
(`POST /v1/load_lora_adapter`, where the engine allows it) and takes the request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from kvpilot_operator.router.config import AdapterRoute, AdapterVariant, Revision, RouteConfig
from kvpilot_operator.router.table import EndpointState, RouteTable, WeightedRoundRobin

# How long an engine that refused a runtime load (not enabled there) is not asked again.
NO_RUNTIME_LOAD_SECONDS = 60.0

Kind = Literal["base", "adapter", "unknown", "unsure"]


@dataclass(frozen=True)
class Choice:
    """The version of an adapter a request gets."""

    model: str  # the adapter as the client named it
    role: str  # stable | canary (its variant, in metrics)
    path: str | None  # the version's folder; None: found on the engines by name


@dataclass(frozen=True)
class Placement:
    endpoint: EndpointState
    name: str  # the engine's name for the version: the body's `model` upstream
    load_path: str | None = None  # set: load it there first (runtime loading)


def name_on(st: EndpointState, choice: Choice) -> str | None:
    """The name `st` serves the chosen version under, or None when it does not hold it."""
    models = st.models or {}
    if choice.path is None:
        card = models.get(choice.model)
        return choice.model if card is not None and card[1] is not None else None
    if choice.model in models and models[choice.model][0] == choice.path:
        return choice.model  # its own name first: no body rewrite
    for name, (root, parent) in models.items():
        if parent is not None and root == choice.path:
            return name
    return None


class AdapterRouter:
    def __init__(self, table: RouteTable):
        self.table = table
        self.routes: dict[str, AdapterRoute] = {}
        self._wrr: dict[str, WeightedRoundRobin] = {}

    def update(self, config: RouteConfig) -> None:
        routes = {a.name: a for a in config.adapters}
        for name, route in routes.items():
            if self.routes.get(name) != route:  # restart a round only when the shares change
                self._wrr[name] = WeightedRoundRobin(
                    [Revision(v.path, v.weight, v.role) for v in route.variants]
                )
        self._wrr = {n: w for n, w in self._wrr.items() if n in routes}
        self.routes = routes

    def classify(self, model: str | None) -> Kind:
        """What `model` names. `unsure` until some ready engine's models were read (the
        engine then answers for itself)."""
        if model is None:
            return "base"
        if model in self.routes:
            return "adapter"
        read = [
            st.models
            for st in self.table.endpoints.values()
            if st.endpoint.ready and st.models is not None
        ]
        if not read:
            return "unsure"
        for models in read:
            card = models.get(model)
            if card is not None:
                if card[1] is None:
                    return "base"
                # Versions the routes send (a canary's `sql@canary`, a shadow's `sql@shadow`) are
                # not asked for by name.
                if card[0] in self._routed_paths():
                    return "unknown"
                return "adapter"
        return "unknown"

    def _routed_paths(self) -> set[str]:
        """The folders of the versions the routes send requests to: variants and shadows."""
        paths = {v.path for r in self.routes.values() for v in r.variants}
        return paths | {r.shadow.path for r in self.routes.values() if r.shadow is not None}

    def choose(self, model: str, now: float) -> Choice:
        route = self.routes.get(model)
        if route is None:
            return Choice(model, "stable", None)
        ready = [st for st in self.table.endpoints.values() if st.endpoint.ready]
        # A version is served where an engine holds it; a canary's also where one can load it
        # (the operator starts engines with the adapters and leaves new versions to load on
        # first use). A stable version nobody holds yet (engines still rolling) sits out.
        can_load = any(st.no_runtime_load_until <= now for st in ready)
        usable = {
            v.path
            for v in route.variants
            if (v.role != "stable" and can_load)
            or any(name_on(st, Choice(model, v.role, v.path)) is not None for st in ready)
        }
        path = self._wrr[model].pick(usable) if usable else None
        variant = _variant(route, path) if path is not None else _heaviest(route)
        return Choice(model, variant.role, variant.path)

    def place(
        self,
        choice: Choice,
        exclude: set[str] | frozenset[str] = frozenset(),
        prefer: str | None = None,
        *,
        now: float,
    ) -> Placement | None:
        """An engine for the chosen version: a holder by bounded-load affinity on the adapter's
        name; an engine that loads it at runtime when every holder is over its bound (or none
        holds it) and one is not; else the least busy holder. None: no engine at all."""

        def holds(st: EndpointState) -> bool:
            return name_on(st, choice) is not None

        holder = self.table.pick(exclude=exclude, prefer=prefer, only=holds, affinity=choice.model)
        revision = holder.revision if holder is not None else prefer
        if revision is None:
            any_st = self.table.pick(exclude=exclude)
            revision = any_st.revision if any_st is not None else None
        if revision is None:
            return None
        everyone = self.table.revision_candidates(revision, exclude)
        bound = self.table.bound(everyone)
        if holder is not None and holder.in_flight < bound:
            return Placement(holder, name_on(holder, choice) or choice.model)
        path = choice.path or self._known_root(choice)
        loaders = [
            st
            for st in everyone
            if not holds(st) and st.no_runtime_load_until <= now and st.in_flight < bound
        ]
        if path is not None and loaders:
            st = min(loaders, key=lambda s: (s.in_flight, s.kv_usage or 0.0))
            return Placement(st, _load_name(choice), load_path=path)
        if holder is not None:
            return Placement(holder, name_on(holder, choice) or choice.model)
        return None

    def _known_root(self, choice: Choice) -> str | None:
        for st in self.table.endpoints.values():
            card = (st.models or {}).get(choice.model)
            if card is not None and card[1] is not None and card[0]:
                return card[0]
        return None

    def loaded(self, st: EndpointState, name: str, path: str) -> None:
        """A runtime load succeeded: `st` holds it from now on (before its next scrape), as an
        adapter of the base model it serves."""
        models = st.models or {}
        base = next((n for n, (_, parent) in models.items() if parent is None), "")
        st.models = {**models, name: (path, base)}

    def refused(self, st: EndpointState, now: float) -> None:
        st.no_runtime_load_until = now + NO_RUNTIME_LOAD_SECONDS

    def listed(self) -> list[dict[str, object]]:
        """The model cards of /v1/models: the union of the engines' own, without the versions
        the routes send under derived names."""
        weighed = self._routed_paths()
        cards: dict[str, dict[str, object]] = {}
        now = int(time.time())
        for st in sorted(self.table.endpoints.values(), key=lambda s: s.url):
            if not st.endpoint.ready or st.models is None:
                continue
            for name, (root, parent) in st.models.items():
                hidden = parent is not None and root in weighed and name not in self.routes
                if name in cards or hidden:
                    continue
                card: dict[str, object] = {
                    "id": name,
                    "object": "model",
                    "created": now,
                    "owned_by": "kvpilot",
                    "root": root,
                    "parent": parent,
                }
                cards[name] = card
        return list(cards.values())


def _variant(route: AdapterRoute, path: str) -> AdapterVariant:
    return next(v for v in route.variants if v.path == path)


def _heaviest(route: AdapterRoute) -> AdapterVariant:
    return max(route.variants, key=lambda v: v.weight)


def _load_name(choice: Choice) -> str:
    return choice.model if choice.role == "stable" else f"{choice.model}@{choice.role}"
