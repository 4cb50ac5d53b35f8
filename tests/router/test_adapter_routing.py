"""The router's adapter choices without a network: what a `model` names, the version a request
gets by the canary's share, affinity with bounded load on the adapter's name, engines found by the
adapter's folder whatever they call it, runtime loading only where every holder is busy, and the
route config's adapters section."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from kvpilot_operator.router.adapters import AdapterRouter, Choice, name_on
from kvpilot_operator.router.config import (
    AdapterRoute,
    AdapterShadow,
    AdapterVariant,
    Endpoint,
    Revision,
    RouteConfig,
)
from kvpilot_operator.router.table import RouteTable

BASE = "chat"
URLS = [f"http://e{i}:8000" for i in range(4)]


def cards(**adapters: str) -> dict[str, tuple[str | None, str | None]]:
    """An engine's /v1/models: the base and {name: folder}."""
    return {BASE: ("smollm2", None), **{n: (p, BASE) for n, p in adapters.items()}}


def setup(
    held: dict[str, dict[str, str]], adapters: tuple[AdapterRoute, ...] = ()
) -> tuple[RouteTable, AdapterRouter]:
    table = RouteTable(rng=random.Random(7))
    config = RouteConfig("svc", (Revision("r1", 100),), adapters=adapters)
    table.update(config, [Endpoint(url, "r1") for url in held])
    for url, models in held.items():
        table.set_models(url, cards(**models))
    router = AdapterRouter(table)
    router.update(config)
    return table, router


def test_what_a_model_names() -> None:
    _table, router = setup({URLS[0]: {"sql": "/a/sql"}, URLS[1]: {"help": "/a/help"}})
    assert router.classify(None) == "base"
    assert router.classify(BASE) == "base"
    assert router.classify("sql") == "adapter" and router.classify("help") == "adapter"
    assert router.classify("nope") == "unknown"
    # Before any engine's models were read, the engines answer for themselves.
    fresh = RouteTable()
    fresh.update(RouteConfig("svc", (Revision("r1", 100),)), [Endpoint(URLS[0], "r1")])
    assert AdapterRouter(fresh).classify("nope") == "unsure"


def test_an_adapters_requests_go_to_its_holders_with_affinity() -> None:
    _table, router = setup(
        {
            URLS[0]: {"sql": "/a/sql"},
            URLS[1]: {"sql": "/a/sql", "help": "/a/help"},
            URLS[2]: {"help": "/a/help"},
            URLS[3]: {},
        }
    )
    for model, holders in (("sql", {URLS[0], URLS[1]}), ("help", {URLS[1], URLS[2]})):
        choice = router.choose(model, 0.0)
        # Affinity: one at a time, always the same holder (the adapter's home on the ring).
        picked = {router.place(choice, now=0.0).endpoint.url for _ in range(20)}  # type: ignore[union-attr]
        assert len(picked) == 1 and picked <= holders


def test_bounded_load_spills_to_the_next_holder_then_loads_elsewhere() -> None:
    table, router = setup(
        {URLS[0]: {"sql": "/a/sql"}, URLS[1]: {"sql": "/a/sql"}, URLS[2]: {}, URLS[3]: {}}
    )
    choice = router.choose("sql", 0.0)
    counts: Counter[str] = Counter()
    loads: list[str] = []
    for _ in range(12):  # requests that stay in flight
        placement = router.place(choice, now=0.0)
        assert placement is not None
        if placement.load_path is not None:
            assert placement.load_path == "/a/sql" and placement.name == "sql"
            loads.append(placement.endpoint.url)
            router.loaded(placement.endpoint, placement.name, placement.load_path)
            assert placement.endpoint.models["sql"] == ("/a/sql", BASE)  # type: ignore[index]
        table.acquire(placement.endpoint)
        counts[placement.endpoint.url] += 1
    # Every engine took a share (1.25 x fair at most), the two without it after loading it.
    assert set(counts) == set(URLS) and max(counts.values()) <= 5
    assert sorted(loads) == [URLS[2], URLS[3]]


def test_a_refused_runtime_load_is_not_asked_again_soon() -> None:
    table, router = setup({URLS[0]: {"sql": "/a/sql"}, URLS[1]: {}})
    choice = router.choose("sql", 0.0)
    table.acquire(table.endpoints[URLS[0]])
    table.acquire(table.endpoints[URLS[0]])
    placement = router.place(choice, now=0.0)
    assert placement is not None and placement.endpoint.url == URLS[1] and placement.load_path
    router.refused(placement.endpoint, now=0.0)
    again = router.place(choice, now=1.0)
    assert again is not None and again.endpoint.url == URLS[0] and again.load_path is None
    later = router.place(choice, now=120.0)
    assert later is not None and later.endpoint.url == URLS[1]


def test_a_canary_gets_its_share_and_is_found_by_folder() -> None:
    route = AdapterRoute(
        "sql",
        (AdapterVariant("/v1", 75, "stable"), AdapterVariant("/v2", 25, "canary")),
    )
    # e0 still runs the canary under its derived name; e1 already serves v2 as `sql`.
    held = {URLS[0]: {"sql": "/v1", "sql@canary": "/v2"}, URLS[1]: {"sql": "/v2"}}
    table, router = setup(held, (route,))
    roles = Counter(router.choose("sql", 0.0).role for _ in range(100))
    assert roles == {"stable": 75, "canary": 25}
    canary = Choice("sql", "canary", "/v2")
    assert name_on(table.endpoints[URLS[0]], canary) == "sql@canary"
    assert name_on(table.endpoints[URLS[1]], canary) == "sql"
    assert name_on(table.endpoints[URLS[1]], Choice("sql", "stable", "/v1")) is None
    # The derived name is the routes' business, not the client's; /v1/models hides it.
    assert router.classify("sql@canary") == "unknown"
    assert {c["id"] for c in router.listed()} == {BASE, "sql"}


def test_a_shadow_version_is_not_asked_for_by_name() -> None:
    route = AdapterRoute("sql", (AdapterVariant("/v1", 100),), AdapterShadow("/v3", 10.0))
    # e0 loaded the shadow at runtime for the copies it was sent.
    _table, router = setup({URLS[0]: {"sql": "/v1", "sql@shadow": "/v3"}}, (route,))
    assert router.classify("sql@shadow") == "unknown"
    assert {c["id"] for c in router.listed()} == {BASE, "sql"}


def test_a_new_version_is_loaded_on_first_use_unless_no_engine_may() -> None:
    route = AdapterRoute(
        "sql", (AdapterVariant("/v1", 50, "stable"), AdapterVariant("/v2", 50, "canary"))
    )
    table, router = setup({URLS[0]: {"sql": "/v1"}}, (route,))
    roles = Counter(router.choose("sql", 0.0).role for _ in range(10))
    assert roles == {"stable": 5, "canary": 5}
    placement = router.place(Choice("sql", "canary", "/v2"), now=0.0)
    assert placement is not None
    assert (placement.name, placement.load_path) == ("sql@canary", "/v2")
    # Where no engine may load it (runtime loading off), the canary sits the round out.
    router.refused(table.endpoints[URLS[0]], now=0.0)
    assert {router.choose("sql", 1.0).role for _ in range(10)} == {"stable"}


def test_route_config_adapters_round_trip_and_refusals() -> None:
    doc = {
        "service": "svc",
        "revisions": [{"name": "r1", "weight": 100}],
        "adapters": [
            {
                "name": "sql",
                "variants": [
                    {"path": "/v1", "weight": 90, "role": "stable"},
                    {"path": "/v2", "weight": 10, "role": "canary"},
                ],
                "shadow": {"path": "/v3", "mirrorPercent": 5, "maxRps": None},
            }
        ],
    }
    config = RouteConfig.from_dict(doc)
    assert config.adapters[0].variants[1] == AdapterVariant("/v2", 10, "canary")
    assert RouteConfig.from_dict(config.to_dict()) == config
    bad = [
        ({"variants": []}, "variants must be a non-empty list"),
        ({"variants": [{"path": "/v1", "weight": 101}]}, "weight must be an integer in [0, 100]"),
        (
            {"variants": [{"path": "/v1", "weight": 1}, {"path": "/v1", "weight": 2}]},
            "variant paths must be unique",
        ),
        (
            {"shadow": {"path": "/v3", "mirrorPercent": 101}},
            "adapters[0].shadow.mirrorPercent must be a number in [0, 100]",
        ),
        ({"shadow": {"path": "/v3", "mirrorPercent": 5, "maxRps": 0}}, "shadow.maxRps must be"),
    ]
    for change, says in bad:
        broken = {**doc, "adapters": [{**doc["adapters"][0], **change}]}
        with pytest.raises(ValueError, match=says.replace("[", r"\[").replace("]", r"\]")):
            RouteConfig.from_dict(broken)


def test_a_placement_on_a_preferred_revision_leaves_the_round_robin_alone() -> None:
    """The adapter shadow's copies go to the primary's revision and do not take turns from the
    revisions' weights (a model canary's share)."""
    config = RouteConfig("svc", (Revision("r1", 50), Revision("r2", 50)))
    table, fresh = RouteTable(rng=random.Random(7)), RouteTable(rng=random.Random(7))
    for t in (table, fresh):
        t.update(config, [Endpoint(URLS[0], "r1"), Endpoint(URLS[1], "r2")])
        for url in URLS[:2]:
            t.set_models(url, cards(sql="/a/sql"))
    router = AdapterRouter(table)
    router.update(config)
    for _ in range(5):
        placement = router.place(Choice("sql", "shadow", "/a/sql"), prefer="r2", now=0.0)
        assert placement is not None and placement.endpoint.url == URLS[1]
    picks = [table.pick().revision for _ in range(6)]  # type: ignore[union-attr]
    assert picks == [fresh.pick().revision for _ in range(6)]  # type: ignore[union-attr]
