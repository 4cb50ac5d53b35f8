"""Routing state and the two choices made per request.

Revision: smooth weighted round robin (nginx's), so a 75/25 canary split is exact over any window
rather than only on average, and revisions interleave instead of arriving in runs. A weighted
revision without a usable endpoint sits the round out; its share goes to the others.

Endpoint within the revision: long prompts go by consistent hashing with bounded loads (CHWBL) on
their first `prefix_chars` characters, so requests that share a system prompt or a conversation
land on the engine whose prefix cache already holds it, yet no engine takes more than
`load_factor` times its fair share. Short prompts have little cache to win, so they go to the
endpoint with the fewest outstanding requests (then the emptiest KV cache, then at random).

Passive health: an endpoint that refused a connection is ejected for `eject_seconds`; when every
candidate is ejected they are used anyway (a guess beats a certain failure).
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from kvpilot_operator.router.config import Endpoint, Revision, RouteConfig

DEFAULT_PREFIX_CHARS = 256
DEFAULT_LOAD_FACTOR = 1.25
DEFAULT_EJECT_SECONDS = 5.0
VIRTUAL_NODES = 100


@dataclass(eq=False)  # identity: one mutable record per endpoint
class EndpointState:
    endpoint: Endpoint
    in_flight: int = 0
    kv_usage: float | None = None  # vllm:kv_cache_usage_perc, scraped
    waiting: float | None = None  # vllm:num_requests_waiting, scraped
    ejected_until: float = 0.0
    # Its /v1/models, scraped: each card's id -> (root: the folder it was loaded from, parent:
    # None for a base model); None until first read.
    models: dict[str, tuple[str | None, str | None]] | None = None
    # Runtime adapter loading refused (off on this engine) until then: not asked again before.
    no_runtime_load_until: float = 0.0

    @property
    def url(self) -> str:
        return self.endpoint.url

    @property
    def revision(self) -> str:
        return self.endpoint.revision


class WeightedRoundRobin:
    """nginx's smooth weighted round robin over named peers."""

    def __init__(self, revisions: Sequence[Revision]):
        self.weights = {r.name: r.weight for r in revisions if r.weight > 0}
        self.current = dict.fromkeys(self.weights, 0)

    def pick(self, eligible: Collection[str]) -> str | None:
        best: str | None = None
        total = 0
        for name, weight in self.weights.items():
            if name not in eligible:
                continue
            self.current[name] += weight
            total += weight
            if best is None or self.current[name] > self.current[best]:
                best = name
        if best is not None:
            self.current[best] -= total
        return best


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class HashRing:
    def __init__(self, urls: Sequence[str], virtual_nodes: int = VIRTUAL_NODES):
        points = sorted((_hash(f"{url}#{i}"), url) for url in urls for i in range(virtual_nodes))
        self._keys = [p[0] for p in points]
        self._urls = [p[1] for p in points]

    def walk(self, key: str) -> Iterator[str]:
        """Distinct endpoints clockwise from the key's point."""
        if not self._urls:
            return
        start = bisect.bisect(self._keys, _hash(key))
        seen: set[str] = set()
        for i in range(len(self._urls)):
            url = self._urls[(start + i) % len(self._urls)]
            if url not in seen:
                seen.add(url)
                yield url


class RouteTable:
    def __init__(
        self,
        *,
        prefix_chars: int = DEFAULT_PREFIX_CHARS,
        load_factor: float = DEFAULT_LOAD_FACTOR,
        eject_seconds: float = DEFAULT_EJECT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ):
        if prefix_chars < 1:
            raise ValueError("prefix_chars must be at least 1")
        if load_factor < 1:
            raise ValueError("load_factor must be at least 1")
        self.prefix_chars = prefix_chars
        self.load_factor = load_factor
        self.eject_seconds = eject_seconds
        self.clock = clock
        self.rng = rng or random.Random()
        self.config: RouteConfig | None = None
        self.endpoints: dict[str, EndpointState] = {}
        self._wrr = WeightedRoundRobin(())
        self._rings: dict[str, tuple[tuple[str, ...], HashRing]] = {}

    # ---- updates ------------------------------------------------------------------------------
    def update(self, config: RouteConfig, endpoints: Sequence[Endpoint]) -> None:
        """A new snapshot. Endpoints that stay keep their counts, load and ejection; the round
        robin restarts only when the weights change (else a reload every second would skew it)."""
        states: dict[str, EndpointState] = {}
        for ep in endpoints:
            st = self.endpoints.get(ep.url)
            if st is None or st.revision != ep.revision:
                st = EndpointState(ep)  # a reused pod IP is a new endpoint
            st.endpoint = ep
            states[ep.url] = st
        self.endpoints = states
        if self.config is None or self.config.revisions != config.revisions:
            self._wrr = WeightedRoundRobin(config.revisions)
        self.config = config

    def set_load(self, url: str, kv_usage: float | None, waiting: float | None) -> None:
        st = self.endpoints.get(url)
        if st is None:
            return
        if kv_usage is not None:
            st.kv_usage = kv_usage
        if waiting is not None:
            st.waiting = waiting

    def set_models(self, url: str, models: dict[str, tuple[str | None, str | None]]) -> None:
        st = self.endpoints.get(url)
        if st is not None:
            st.models = models

    def eject(self, url: str) -> None:
        st = self.endpoints.get(url)
        if st is not None:
            st.ejected_until = self.clock() + self.eject_seconds

    @staticmethod
    def acquire(st: EndpointState) -> None:
        st.in_flight += 1

    @staticmethod
    def release(st: EndpointState) -> None:
        st.in_flight = max(0, st.in_flight - 1)

    # ---- queries ------------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self.config is not None

    def _weighted(self) -> set[str]:
        return set() if self.config is None else set(self._wrr.weights)

    def has_primary(self) -> bool:
        """Whether a request could be sent anywhere now (else it waits: scale from zero)."""
        weighted = self._weighted()
        return any(st.endpoint.ready and st.revision in weighted for st in self.endpoints.values())

    def has_shadow(self) -> bool:
        shadow = self.config.shadow if self.config else None
        return shadow is not None and any(
            st.endpoint.ready and st.revision == shadow.revision for st in self.endpoints.values()
        )

    def ready_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for st in self.endpoints.values():
            if st.endpoint.ready:
                counts[st.revision] = counts.get(st.revision, 0) + 1
        return counts

    # ---- choices ------------------------------------------------------------------------------
    def _candidates(
        self,
        revisions: Collection[str],
        exclude: Collection[str],
        only: Callable[[EndpointState], bool] | None = None,
    ) -> dict[str, list[EndpointState]]:
        """Usable endpoints by revision: ready, not excluded, and not ejected unless all are."""
        now = self.clock()
        usable = [
            st
            for st in self.endpoints.values()
            if st.endpoint.ready
            and st.revision in revisions
            and st.url not in exclude
            and (only is None or only(st))
        ]
        healthy = [st for st in usable if st.ejected_until <= now] or usable
        by_rev: dict[str, list[EndpointState]] = {}
        for st in healthy:
            by_rev.setdefault(st.revision, []).append(st)
        return by_rev

    def pick(
        self,
        prompt: str = "",
        exclude: Collection[str] = (),
        prefer: str | None = None,
        *,
        only: Callable[[EndpointState], bool] | None = None,
        affinity: str | None = None,
    ) -> EndpointState | None:
        """The endpoint for a user request; `prefer` (a retry's revision) wins while it has one.
        `only`: endpoints that can serve it (an adapter's holders); `affinity`: a key hashed for
        bounded-load affinity instead of the prompt's prefix (an adapter's name)."""
        by_rev = self._candidates(self._weighted(), exclude, only)
        if not by_rev:
            return None
        revision = prefer if prefer in by_rev else self._wrr.pick(by_rev)
        assert revision is not None
        if affinity is not None:
            return self._bounded_hash(revision, by_rev[revision], affinity)
        return self._pick_in(revision, by_rev[revision], prompt)

    def revision_candidates(
        self, revision: str, exclude: Collection[str] = ()
    ) -> list[EndpointState]:
        return self._candidates({revision}, exclude).get(revision, [])

    def bound(self, cands: Sequence[EndpointState]) -> int:
        """The most requests an endpoint of `cands` may have before a bounded-load choice moves
        on (CHWBL's bound, with one more request to place)."""
        total = sum(st.in_flight for st in cands)
        return math.ceil(self.load_factor * (total + 1) / max(1, len(cands)))

    def pick_any(self, exclude: Collection[str] = ()) -> EndpointState | None:
        """Any primary endpoint, least loaded first (for /v1/models; leaves the weights alone)."""
        cands = [st for sts in self._candidates(self._weighted(), exclude).values() for st in sts]
        return self._least_loaded(cands) if cands else None

    def pick_shadow(self, exclude: Collection[str] = ()) -> EndpointState | None:
        if self.config is None or self.config.shadow is None:
            return None
        by_rev = self._candidates({self.config.shadow.revision}, exclude)
        cands = next(iter(by_rev.values()), [])
        return self._least_loaded(cands) if cands else None

    def _pick_in(self, revision: str, cands: list[EndpointState], prompt: str) -> EndpointState:
        if len(cands) == 1:
            return cands[0]
        if len(prompt) >= self.prefix_chars:
            return self._bounded_hash(revision, cands, prompt[: self.prefix_chars])
        return self._least_loaded(cands)

    def _least_loaded(self, cands: list[EndpointState]) -> EndpointState:
        def load(st: EndpointState) -> tuple[int, float]:
            return st.in_flight, st.kv_usage or 0.0

        best = min(load(st) for st in cands)
        return self.rng.choice([st for st in cands if load(st) == best])

    def _ring(self, revision: str) -> HashRing:
        # Built over every ready endpoint of the revision, not just today's candidates, so that an
        # ejection or a retry's exclusion does not move every other prefix to a new endpoint.
        urls = tuple(
            sorted(
                st.url
                for st in self.endpoints.values()
                if st.revision == revision and st.endpoint.ready
            )
        )
        cached = self._rings.get(revision)
        if cached is None or cached[0] != urls:
            cached = (urls, HashRing(urls))
            self._rings[revision] = cached
        return cached[1]

    def _bounded_hash(self, revision: str, cands: list[EndpointState], key: str) -> EndpointState:
        by_url = {st.url: st for st in cands}
        bound = self.bound(cands)
        for url in self._ring(revision).walk(key):
            st = by_url.get(url)
            if st is not None and st.in_flight < bound:
                return st
        return self._least_loaded(cands)  # unreachable: the bound always leaves room

    # ---- for /router/state ----------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "config": self.config.to_dict() if self.config else None,
            "endpoints": [
                {
                    "url": st.url,
                    "revision": st.revision,
                    "ready": st.endpoint.ready,
                    "inFlight": st.in_flight,
                    "kvUsage": st.kv_usage,
                    "waiting": st.waiting,
                    "ejected": st.ejected_until > now,
                    "adapters": sorted(
                        name for name, (_, parent) in (st.models or {}).items() if parent
                    ),
                }
                for st in sorted(self.endpoints.values(), key=lambda s: s.url)
            ],
        }
