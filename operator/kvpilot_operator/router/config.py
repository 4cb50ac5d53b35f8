"""The route config: the JSON contract between the operator (ConfigMap `<service>-router`, key
`routes.json`) and the router. Parsed strictly, so a bad write is reported with the field at
fault and the router keeps its last good routes."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Endpoint:
    url: str
    revision: str
    ready: bool = True


@dataclass(frozen=True)
class Revision:
    name: str
    weight: int
    role: str = "stable"


@dataclass(frozen=True)
class Shadow:
    revision: str
    mirror_percent: float
    max_rps: float | None = None


@dataclass(frozen=True)
class AdapterVariant:
    """One version of an adapter, by its folder on the engines (each engine may know it by
    another name: `sql` there, `sql@canary` here during a promotion)."""

    path: str
    weight: int
    role: str = "stable"


@dataclass(frozen=True)
class AdapterShadow:
    path: str
    mirror_percent: float
    max_rps: float | None = None


@dataclass(frozen=True)
class AdapterRoute:
    name: str  # what clients send as `model`
    variants: tuple[AdapterVariant, ...]
    shadow: AdapterShadow | None = None


@dataclass(frozen=True)
class RouteConfig:
    service: str
    revisions: tuple[Revision, ...]
    shadow: Shadow | None = None
    endpoints: tuple[Endpoint, ...] = ()  # read in static (--config) mode only
    # spec.adapters with their versions' shares; adapters not listed are found on the engines.
    adapters: tuple[AdapterRoute, ...] = ()

    @classmethod
    def from_json(cls, text: str | bytes) -> RouteConfig:
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise ValueError(f"route config: not valid JSON: {e}") from None
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: Any) -> RouteConfig:
        _check(isinstance(doc, dict), "must be a JSON object")
        service = doc.get("service", "")
        _check(isinstance(service, str), "service must be a string")
        revisions = _revisions(doc.get("revisions"))
        shadow = _shadow(doc.get("shadow"))
        if shadow is not None:
            weighted = {r.name for r in revisions if r.weight > 0}
            _check(
                shadow.revision not in weighted,
                f"shadow.revision {shadow.revision!r} also takes user traffic (weight > 0)",
            )
        endpoints = _endpoints(doc.get("endpoints", []))
        return cls(service, revisions, shadow, endpoints, _adapters(doc.get("adapters", [])))

    @classmethod
    def implicit(cls, service: str, revisions: Iterable[str]) -> RouteConfig:
        """No ConfigMap (yet): every revision that has ready pods gets the same weight. With no
        pods there are no revisions, and requests wait for some (scale from zero)."""
        return cls(service, tuple(Revision(n, 1) for n in sorted(set(revisions))))

    def to_dict(self) -> dict[str, Any]:
        shadow = None
        if self.shadow is not None:
            shadow = {
                "revision": self.shadow.revision,
                "mirrorPercent": self.shadow.mirror_percent,
                "maxRps": self.shadow.max_rps,
            }
        return {
            "service": self.service,
            "revisions": [
                {"name": r.name, "weight": r.weight, "role": r.role} for r in self.revisions
            ],
            "shadow": shadow,
            "endpoints": [{"url": e.url, "revision": e.revision} for e in self.endpoints],
            "adapters": [
                {
                    "name": a.name,
                    "variants": [
                        {"path": v.path, "weight": v.weight, "role": v.role} for v in a.variants
                    ],
                    "shadow": None
                    if a.shadow is None
                    else {
                        "path": a.shadow.path,
                        "mirrorPercent": a.shadow.mirror_percent,
                        "maxRps": a.shadow.max_rps,
                    },
                }
                for a in self.adapters
            ],
        }


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"route config: {message}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _revisions(raw: Any) -> tuple[Revision, ...]:
    _check(isinstance(raw, list) and len(raw) > 0, "revisions must be a non-empty list")
    out: list[Revision] = []
    for i, r in enumerate(raw):
        where = f"revisions[{i}]"
        _check(isinstance(r, dict), f"{where} must be an object")
        name, weight, role = r.get("name"), r.get("weight"), r.get("role", "stable")
        _check(isinstance(name, str) and name != "", f"{where}.name must be a non-empty string")
        _check(
            _is_int(weight) and weight >= 0,
            f"{where}.weight must be a non-negative integer, got {weight!r}",
        )
        _check(isinstance(role, str), f"{where}.role must be a string")
        out.append(Revision(name, weight, role))
    names = [r.name for r in out]
    dups = sorted({n for n in names if names.count(n) > 1})
    _check(not dups, f"revision names must be unique, repeated: {', '.join(dups)}")
    return tuple(out)


def _shadow(raw: Any) -> Shadow | None:
    if raw is None:
        return None
    _check(isinstance(raw, dict), "shadow must be an object or null")
    revision = raw.get("revision")
    _check(isinstance(revision, str) and revision != "", "shadow.revision must be a string")
    return Shadow(revision, *_sampling(raw, "shadow"))


def _sampling(raw: dict[str, Any], where: str) -> tuple[float, float | None]:
    """A shadow's (mirrorPercent, maxRps): the model's and each adapter's."""
    percent, max_rps = raw.get("mirrorPercent"), raw.get("maxRps")
    _check(
        _is_number(percent) and 0 <= percent <= 100,
        f"{where}.mirrorPercent must be a number in [0, 100], got {percent!r}",
    )
    _check(
        max_rps is None or (_is_number(max_rps) and max_rps > 0),
        f"{where}.maxRps must be a positive number or null, got {max_rps!r}",
    )
    return float(percent), None if max_rps is None else float(max_rps)


def _endpoints(raw: Any) -> tuple[Endpoint, ...]:
    _check(isinstance(raw, list), "endpoints must be a list")
    out: list[Endpoint] = []
    for i, e in enumerate(raw):
        where = f"endpoints[{i}]"
        _check(isinstance(e, dict), f"{where} must be an object")
        url, revision = e.get("url"), e.get("revision")
        _check(
            isinstance(url, str) and url.startswith(("http://", "https://")),
            f"{where}.url must be an http(s) URL, got {url!r}",
        )
        _check(isinstance(revision, str) and revision != "", f"{where}.revision must be a string")
        out.append(Endpoint(url.rstrip("/"), revision))
    urls = [e.url for e in out]
    dups = sorted({u for u in urls if urls.count(u) > 1})
    _check(not dups, f"endpoint URLs must be unique, repeated: {', '.join(dups)}")
    return tuple(out)


def _adapters(raw: Any) -> tuple[AdapterRoute, ...]:
    _check(isinstance(raw, list), "adapters must be a list")
    out: list[AdapterRoute] = []
    for i, a in enumerate(raw):
        where = f"adapters[{i}]"
        _check(isinstance(a, dict), f"{where} must be an object")
        name, variants = a.get("name"), a.get("variants")
        _check(isinstance(name, str) and name != "", f"{where}.name must be a non-empty string")
        _check(
            isinstance(variants, list) and len(variants) > 0,
            f"{where}.variants must be a non-empty list",
        )
        parsed: list[AdapterVariant] = []
        for j, v in enumerate(variants):
            vwhere = f"{where}.variants[{j}]"
            _check(isinstance(v, dict), f"{vwhere} must be an object")
            path, weight, role = v.get("path"), v.get("weight"), v.get("role", "stable")
            _check(isinstance(path, str) and path != "", f"{vwhere}.path must be a string")
            _check(
                _is_int(weight) and 0 <= weight <= 100,
                f"{vwhere}.weight must be an integer in [0, 100], got {weight!r}",
            )
            _check(isinstance(role, str), f"{vwhere}.role must be a string")
            parsed.append(AdapterVariant(path, weight, role))
        paths = [v.path for v in parsed]
        _check(len(set(paths)) == len(paths), f"{where}: variant paths must be unique")
        shadow = a.get("shadow")
        adapter_shadow = None
        if shadow is not None:
            _check(isinstance(shadow, dict), f"{where}.shadow must be an object or null")
            path = shadow.get("path")
            _check(isinstance(path, str) and path != "", f"{where}.shadow.path must be a string")
            adapter_shadow = AdapterShadow(path, *_sampling(shadow, f"{where}.shadow"))
        out.append(AdapterRoute(name, tuple(parsed), adapter_shadow))
    names = [a.name for a in out]
    dups = sorted({n for n in names if names.count(n) > 1})
    _check(not dups, f"adapter names must be unique, repeated: {', '.join(dups)}")
    return tuple(out)
