"""Leader election (`controller.leader`): the Lease rules on a stand-in for the API's Lease
resource (fast), and two `kvpilot operator` processes against one local control plane (slow): one
acts, the other only waits; killed, the holder is replaced within 30 s."""

from __future__ import annotations

import copy
import json
import re
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic.exceptions import ConflictError, NotFoundError
from kvpilot_operator.controller.leader import LeaderElector, standby_health, take_or_renew
from kvpilot_operator.local.cluster import LocalCluster
from kvpilot_operator.local.procs import free_ports

from tests.support.kube import ROOT, Operator, apply, events, get, service_doc, wait_for

# --- the rules, without a cluster ---------------------------------------------------------------

T0 = "2024-01-01T00:00:00.000000Z"
T1 = "2024-01-01T00:00:09.000000Z"


def test_a_free_lease_is_taken_and_a_held_one_waits_for_its_term_on_the_observers_clock() -> None:
    first = take_or_renew(None, 0.0, 0.0, "a", 15, T0)
    assert first == {
        "holderIdentity": "a",
        "leaseDurationSeconds": 15,
        "acquireTime": T0,
        "renewTime": T0,
        "leaseTransitions": 0,
    }
    # b first saw a's record at t=100 (its own clock; renewTime is never compared with it).
    assert take_or_renew(first, 100.0, 114.9, "b", 15, T1) is None
    taken = take_or_renew(first, 100.0, 115.0, "b", 15, T1)
    assert taken is not None
    assert (taken["holderIdentity"], taken["acquireTime"], taken["leaseTransitions"]) == (
        "b",
        T1,
        1,
    )
    # The holder renews: the same term start and transitions, a new renewTime.
    renewed = take_or_renew(first, 0.0, 5.0, "a", 15, T1)
    assert renewed == {**first, "renewTime": T1}
    # Released (no holder): free at once.
    released = {**first, "holderIdentity": "", "leaseDurationSeconds": 1}
    assert take_or_renew(released, 100.0, 100.0, "b", 15, T1)["holderIdentity"] == "b"


class Instance:
    def __init__(self, obj: dict[str, Any]) -> None:
        self.obj = obj

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.obj)


class Leases:
    """The Lease resource as the dynamic client serves it: NotFound, and Conflict on a stale
    resourceVersion. `down` makes every call fail, as an unreachable API server does."""

    def __init__(self) -> None:
        self.obj: dict[str, Any] | None = None
        self.version = 0
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise ConnectionError("API server unreachable")

    def _store(self, body: dict[str, Any]) -> None:
        self.version += 1
        self.obj = copy.deepcopy(body)
        self.obj["metadata"]["resourceVersion"] = str(self.version)

    def get(self, name: str, namespace: str, **_: Any) -> Instance:
        self._check()
        if self.obj is None:
            raise NotFoundError(ApiException(status=404, reason="Not Found"))
        return Instance(self.obj)

    def create(self, body: dict[str, Any], namespace: str, **_: Any) -> None:
        self._check()
        if self.obj is not None:
            raise ConflictError(ApiException(status=409, reason="AlreadyExists"))
        self._store(body)

    def replace(self, body: dict[str, Any], name: str, namespace: str, **_: Any) -> None:
        self._check()
        assert self.obj is not None
        if body["metadata"]["resourceVersion"] != self.obj["metadata"]["resourceVersion"]:
            raise ConflictError(ApiException(status=409, reason="Conflict"))
        self._store(body)


class FakeKube:
    def __init__(self, leases: Leases) -> None:
        self.leases = leases

    def resource(self, api_version: str, kind: str) -> Leases:
        assert (api_version, kind) == ("coordination.k8s.io/v1", "Lease")
        return self.leases


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def electors(*names: str) -> tuple[Leases, Clock, list[LeaderElector]]:
    leases, clock = Leases(), Clock()
    out = [
        LeaderElector(FakeKube(leases), "ops", identity=n, clock=clock)  # type: ignore[arg-type]
        for n in names
    ]
    return leases, clock, out


def test_one_of_two_leads_and_a_clean_stop_hands_over_at_once() -> None:
    leases, clock, (a, b) = electors("a", "b")
    a._round()
    b._round()
    assert a.leading.is_set() and not b.leading.is_set()
    assert b.holder == "a"
    for _ in range(5):  # a renews every retry period; b's view of the term restarts each time
        clock.t += 2
        a._round()
        b._round()
    assert a.leading.is_set() and not b.leading.is_set()
    a.stop()  # releases
    assert leases.obj is not None and leases.obj["spec"]["holderIdentity"] == ""
    b._round()
    assert b.leading.is_set()
    assert leases.obj["spec"]["holderIdentity"] == "b"
    assert leases.obj["spec"]["leaseTransitions"] == 1


def test_a_dead_holder_is_replaced_after_the_lease_duration() -> None:
    _, clock, (a, b) = electors("a", "b")
    a._round()
    b._round()
    # a dies: its record no longer changes.
    clock.t += 14.0
    b._round()
    assert not b.leading.is_set()
    clock.t += 1.0
    b._round()
    assert b.leading.is_set()


def test_a_holder_that_cannot_renew_stops_acting_before_anyone_may_take_over() -> None:
    leases, clock, (a,) = electors("a")
    stopped = []
    a.on_lost = lambda: stopped.append(clock.t)
    a._round()
    assert a.leading.is_set()
    leases.down = True
    clock.t += 9.9
    a._round()
    assert not a.lost.is_set()
    clock.t += 0.1
    a._round()
    assert a.lost.is_set() and stopped == [clock.t]
    # Stopped 10 s after the last renewal, 5 s before a follower's 15 s term would run out.


def test_a_follower_answers_its_liveness_probe() -> None:
    _, _, (a,) = electors("a")
    a.holder = "someone-else"
    port = free_ports(1)[0]
    url = f"http://127.0.0.1:{port}/healthz"
    with standby_health(port, a), urllib.request.urlopen(url, timeout=5) as r:
        assert r.status == 200
        assert json.loads(r.read()) == {"leader": False, "holder": "someone-else"}


# --- two operators on one control plane -----------------------------------------------------------


def identity(op: Operator) -> str | None:
    m = re.search(r"acquired: this replica \((\S+)\) acts", op.log_text())
    return m.group(1) if m else None


@pytest.mark.slow
def test_two_operators_one_acts_and_the_other_takes_over_when_it_is_killed(
    cluster: LocalCluster, ns: str, tmp_path: Path
) -> None:
    # kubectl 1.20 does not know the CEL rules' field (x-kubernetes-validations), its server does.
    cluster.kubectl("apply", "--validate=false", "-f", str(ROOT / "crds"))
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/llmservices.kvpilot.io"
    )
    lease = ("--leader-election-namespace", ns)  # a Lease of this test's own
    ops = [Operator(cluster, tmp_path / f"operator-{i}.log", lease) for i in range(2)]
    for op in ops:
        op.start()
    try:
        holder = wait_for(
            "a Lease holder",
            lambda: (
                (get(cluster, "lease", "kvpilot-operator", ns) or {})
                .get("spec", {})
                .get("holderIdentity")
            ),
        )
        leader, follower = sorted(ops, key=lambda op: identity(op) != holder)
        assert identity(leader) == holder and identity(follower) is None
        wait_for(
            "the follower to see the holder", lambda: f"held by {holder}" in follower.log_text()
        )

        apply(cluster, service_doc("first"), ns)
        wait_for("the first Deployment", lambda: get(cluster, "deployment", "first-engine", ns))
        # Every event about it comes from the holder; the follower has handled nothing.
        wait_for("the first events", lambda: events(cluster, ns, "first"))
        assert {e.get("reportingInstance") for e in events(cluster, ns, "first")} == {holder}
        assert "Handler" not in follower.log_text()

        assert leader.proc is not None
        leader.proc.send_signal(signal.SIGKILL)  # no release: the follower waits out the term
        leader.proc.wait()
        killed = time.monotonic()
        apply(cluster, service_doc("second"), ns)
        wait_for(
            "the second Deployment, from the new holder",
            lambda: get(cluster, "deployment", "second-engine", ns),
            timeout=30,
        )
        took = time.monotonic() - killed
        new_holder = get(cluster, "lease", "kvpilot-operator", ns)["spec"]["holderIdentity"]
        assert new_holder == identity(follower) != holder
        print(f"takeover: the second service reconciled {took:.1f} s after the leader was killed")

        # A clean stop releases the Lease: the restarted first replica, now the follower, takes
        # over without waiting out a term.
        leader.start()
        wait_for("the restarted replica to wait", lambda: leader.log_text().count(" waits") >= 1)
        assert follower.stop() in (0, -signal.SIGTERM)
        stopped = time.monotonic()
        apply(cluster, service_doc("third"), ns)
        wait_for(
            "the third Deployment",
            lambda: get(cluster, "deployment", "third-engine", ns),
            timeout=10,
        )
        took = time.monotonic() - stopped
        print(f"handover: the third service reconciled {took:.1f} s after the holder stopped")
    finally:
        for op in ops:
            if op.alive():
                assert op.stop() in (0, -signal.SIGTERM)
        for op in ops:
            print(op.log_text()[-3000:])
