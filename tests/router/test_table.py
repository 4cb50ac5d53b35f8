"""The router's routing state without a network: route config parsing, weighted revision choice,
prefix affinity with bounded loads, least-outstanding choice, passive ejection."""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Callable

import pytest
from kvpilot_operator.router.config import Endpoint, Revision, RouteConfig, Shadow
from kvpilot_operator.router.table import RouteTable, WeightedRoundRobin


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def config(weights: dict[str, int], shadow: str | None = None) -> RouteConfig:
    revisions = tuple(Revision(name, w) for name, w in weights.items())
    return RouteConfig("svc", revisions, Shadow(shadow, 100.0) if shadow else None)


def endpoints(spec: dict[str, int]) -> list[Endpoint]:
    """{'a': 2} -> two endpoints of revision a."""
    return [Endpoint(f"http://{rev}-{i}:8000", rev) for rev, n in spec.items() for i in range(n)]


def rev(t: RouteTable, prompt: str = "") -> str:
    st = t.pick(prompt)
    assert st is not None
    return st.revision


def table(
    weights: dict[str, int], spec: dict[str, int], clock: Callable[[], float] = time.monotonic
) -> RouteTable:
    t = RouteTable(rng=random.Random(0), clock=clock)
    t.update(config(weights), endpoints(spec))
    return t


LONG = "You are a helpful assistant. " * 20  # > 256 characters: prefix affinity applies


# ---- the route config ----------------------------------------------------------------------------
def test_the_contract_example_parses_and_round_trips() -> None:
    doc = {
        "service": "chat",
        "revisions": [
            {"name": "7f3a9c1e20", "weight": 75, "role": "stable"},
            {"name": "c41d0b9e55", "weight": 25, "role": "canary"},
        ],
        "shadow": {"revision": "0a9e7d2c11", "mirrorPercent": 10.0, "maxRps": 5.0},
        "endpoints": [
            {"url": "http://127.0.0.1:8001", "revision": "7f3a9c1e20"},
            {"url": "http://127.0.0.1:8002/", "revision": "c41d0b9e55"},
            {"url": "http://127.0.0.1:8003", "revision": "0a9e7d2c11"},
        ],
    }
    c = RouteConfig.from_dict(doc)
    assert [(r.name, r.weight, r.role) for r in c.revisions] == [
        ("7f3a9c1e20", 75, "stable"),
        ("c41d0b9e55", 25, "canary"),
    ]
    assert c.shadow == Shadow("0a9e7d2c11", 10.0, 5.0)
    assert c.endpoints[1].url == "http://127.0.0.1:8002"  # trailing slash dropped
    assert RouteConfig.from_dict(c.to_dict()) == c
    bare = RouteConfig.from_json('{"revisions": [{"name": "r", "weight": 1}]}')
    assert bare.shadow is None and bare.endpoints == () and bare.revisions[0].role == "stable"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("[1]", "must be a JSON object"),
        ("{", "not valid JSON"),
        ("{}", "revisions must be a non-empty list"),
        ('{"revisions": []}', "revisions must be a non-empty list"),
        ('{"revisions": [{"weight": 1}]}', "revisions[0].name"),
        ('{"revisions": [{"name": "a", "weight": -1}]}', "revisions[0].weight"),
        ('{"revisions": [{"name": "a", "weight": 0.5}]}', "revisions[0].weight"),
        ('{"revisions": [{"name": "a", "weight": true}]}', "revisions[0].weight"),
        ('{"revisions": [{"name": "a", "weight": 1}, {"name": "a", "weight": 2}]}', "unique"),
        (
            '{"revisions": [{"name": "a", "weight": 1}], "shadow": {"revision": "s",'
            ' "mirrorPercent": 150}}',
            "mirrorPercent",
        ),
        (
            '{"revisions": [{"name": "a", "weight": 1}], "shadow": {"revision": "s",'
            ' "mirrorPercent": 10, "maxRps": 0}}',
            "maxRps",
        ),
        (
            '{"revisions": [{"name": "a", "weight": 1}], "shadow": {"revision": "a",'
            ' "mirrorPercent": 10}}',
            "takes user traffic",
        ),
        (
            '{"revisions": [{"name": "a", "weight": 1}], "endpoints": [{"url": "tcp://x",'
            ' "revision": "a"}]}',
            "endpoints[0].url",
        ),
        (
            '{"revisions": [{"name": "a", "weight": 1}], "endpoints": [{"url": "http://x"}]}',
            "endpoints[0].revision",
        ),
    ],
)
def test_bad_configs_are_refused_with_the_field_at_fault(doc: str, message: str) -> None:
    with pytest.raises(ValueError, match="route config") as err:
        RouteConfig.from_json(doc)
    assert message in str(err.value)


# ---- weighted revision choice --------------------------------------------------------------------
def test_weighted_round_robin_is_nginx_smooth_and_exact() -> None:
    wrr = WeightedRoundRobin([Revision("a", 5), Revision("b", 1), Revision("c", 1)])
    seq = [wrr.pick({"a", "b", "c"}) for _ in range(14)]
    # nginx's documented sequence for 5/1/1, twice: smooth, not "aaaaabc".
    assert "".join(s or "" for s in seq) == "aabacaa" * 2

    t = table({"stable": 75, "canary": 25, "off": 0}, {"stable": 1, "canary": 1, "off": 1})
    picks = [rev(t) for _ in range(1000)]
    assert Counter(picks) == {"stable": 750, "canary": 250}
    for i in range(0, 1000, 4):  # exact in every window of 4, not just in total
        assert Counter(picks[i : i + 4]) == {"stable": 3, "canary": 1}


def test_a_revision_without_ready_endpoints_gives_its_share_to_the_others() -> None:
    t = table({"a": 50, "b": 30, "c": 20}, {"a": 1, "c": 1})
    picks = Counter(rev(t) for _ in range(100))
    assert "b" not in picks and abs(picks["a"] - 100 * 50 / 70) <= 1
    # Not ready counts as absent; so does every endpoint of a revision being ejected.
    t.update(t.config, [*endpoints({"a": 1, "c": 1}), Endpoint("http://b", "b", ready=False)])
    assert "b" not in {rev(t) for _ in range(50)}


def test_reloading_the_same_weights_keeps_the_sequence_and_new_weights_restart_it() -> None:
    t = table({"a": 3, "b": 1}, {"a": 1, "b": 1})
    first = [rev(t) for _ in range(2)]
    t.update(config({"a": 3, "b": 1}), endpoints({"a": 1, "b": 1}))  # the 1 s file poll
    rest = [rev(t) for _ in range(2)]
    assert Counter(first + rest) == {"a": 3, "b": 1}
    t.update(config({"a": 1, "b": 9}), endpoints({"a": 1, "b": 1}))
    assert Counter(rev(t) for _ in range(10)) == {"a": 1, "b": 9}


# ---- prefix affinity with bounded loads ----------------------------------------------------------
def test_long_prompts_stick_to_one_endpoint_by_their_prefix() -> None:
    t = table({"a": 1}, {"a": 4})
    first = t.pick(LONG + "question one")
    assert first is not None
    # Same first 256 characters, different tails: same endpoint (its prefix cache is warm).
    for tail in ("question two", "something else entirely", "x" * 500):
        assert t.pick(LONG + tail) is first
    # Different prefixes spread over the endpoints.
    spread = {t.pick(f"{i:04d} " + LONG).url for i in range(64)}
    assert len(spread) == 4


def test_removing_an_endpoint_only_moves_the_prefixes_it_had() -> None:
    t = table({"a": 1}, {"a": 5})
    prompts = [f"{i:04d} " + LONG for i in range(200)]
    before = {p: t.pick(p).url for p in prompts}
    gone = "http://a-2:8000"
    t.update(t.config, [e for e in endpoints({"a": 5}) if e.url != gone])
    after = {p: t.pick(p).url for p in prompts}
    moved = [p for p in prompts if before[p] != after[p]]
    assert moved and all(before[p] == gone for p in moved)
    assert len(moved) == sum(1 for p in prompts if before[p] == gone)


def test_bounded_loads_cap_one_hot_prefix() -> None:
    t = table({"a": 1}, {"a": 4})
    held = []
    for _ in range(40):  # the same hot prompt, none finishing
        st = t.pick(LONG)
        assert st is not None
        loads = [s.in_flight for s in t.endpoints.values()]
        bound = math.ceil(1.25 * (sum(loads) + 1) / 4)
        assert st.in_flight < bound  # the chosen endpoint had room under the bound
        t.acquire(st)
        held.append(st)
        assert max(s.in_flight for s in t.endpoints.values()) <= bound
    loads = sorted(s.in_flight for s in t.endpoints.values())
    assert loads[-1] <= math.ceil(1.25 * 40 / 4) and loads[0] >= 1  # spilled over, capped
    for st in held:
        t.release(st)
    assert t.pick(LONG) is held[0]  # idle again: back to its home endpoint


# ---- least outstanding ---------------------------------------------------------------------------
def test_short_prompts_go_to_the_least_loaded_then_the_emptiest_kv_cache() -> None:
    t = table({"a": 1}, {"a": 3})
    e0, e1, e2 = t.endpoints.values()
    e0.in_flight, e1.in_flight, e2.in_flight = 2, 0, 1
    assert t.pick("hi") is e1
    e1.in_flight = 1
    t.set_load(e1.url, 0.7, 0.0)
    t.set_load(e2.url, 0.2, 3.0)
    assert t.pick("hi") is e2  # tie on in-flight: lower KV usage wins
    t.set_load(e1.url, 0.2, None)
    assert {t.pick("hi") for _ in range(50)} == {e1, e2}  # full tie: at random
    assert e1.waiting == 0.0  # None leaves the last scraped value


# ---- passive health ------------------------------------------------------------------------------
def test_ejected_endpoints_sit_out_until_their_time_is_up() -> None:
    clock = FakeClock()
    t = table({"a": 1, "b": 1}, {"a": 2, "b": 1}, clock=clock)  # ejections last 5 s
    a0, a1, b0 = t.endpoints.values()
    t.eject(a0.url)
    assert a0 not in {t.pick("hi") for _ in range(50)}
    t.eject(b0.url)  # revision b has nothing left: a takes all its traffic
    assert {t.pick("hi") for _ in range(20)} == {a1}
    t.eject(a1.url)  # everything ejected: a guess beats a certain failure
    assert {t.pick("hi") for _ in range(50)} == {a0, a1, b0}
    clock.now += 5.1
    assert t.snapshot()["endpoints"][0]["ejected"] is False


def test_retries_exclude_tried_endpoints_and_prefer_the_same_revision() -> None:
    t = table({"a": 1, "b": 1}, {"a": 2, "b": 1})
    a0, a1, b0 = t.endpoints.values()
    for _ in range(10):
        assert t.pick("hi", exclude={a0.url}, prefer="a") is a1
    assert t.pick("hi", exclude={a0.url, a1.url}, prefer="a") is b0
    assert t.pick("hi", exclude={a0.url, a1.url, b0.url}) is None


def test_updates_keep_counts_and_shadow_endpoints_take_no_user_traffic() -> None:
    t = RouteTable()
    assert not t.loaded and not t.has_primary() and t.pick() is None
    t.update(config({"a": 1}, shadow="s"), [Endpoint("http://s", "s")])
    assert t.loaded and not t.has_primary() and t.has_shadow()
    assert t.pick() is None and t.pick_shadow().url == "http://s"
    t.update(config({"a": 1}, shadow="s"), [Endpoint("http://s", "s"), Endpoint("http://a", "a")])
    st = t.pick()
    assert st is not None and st.url == "http://a"
    t.acquire(st)
    t.update(config({"a": 1}), [Endpoint("http://a", "a")])
    assert t.endpoints["http://a"].in_flight == 1 and not t.has_shadow()
    assert t.ready_counts() == {"a": 1}
    implicit = RouteConfig.implicit("svc", ["r2", "r1", "r2"])
    assert [(r.name, r.weight) for r in implicit.revisions] == [("r1", 1), ("r2", 1)]
