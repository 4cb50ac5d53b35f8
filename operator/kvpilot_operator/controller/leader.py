"""Leader election: of several `kvpilot operator` replicas, only the holder of one Lease acts.

A coordination.k8s.io/v1 Lease managed here, not kopf's peering. Peering needs kopf's own
KopfPeering/ClusterKopfPeering CRDs installed and cluster-wide rights on them, and it is no
election: operators of equal priority all pause, a higher priority preempts. A Lease is what
Kubernetes' own controllers use (client-go's leaderelection; the same rules and default timings
here), needs no CRD, and is granted by a Role in the operator's own namespace.

A follower does nothing but look at the Lease every `retry_period`: kopf (every handler, the
autoscaler and the rollout loops) starts only in the holder (`run_elected`), so a follower
neither reconciles, scales nor rolls out, and writes nothing but its attempts on the Lease. The
holder renews every `retry_period`; one that has not renewed for `renew_deadline` stops acting
(kopf stops, and `kvpilot operator` exits 1 to be restarted as a follower) before any follower may
take over, which is `lease_duration` after the last renewal that follower saw, timed on its own
clock, so that clock skew between replicas does not matter. A holder that stops cleanly
releases the Lease, so that a rolling update hands over within one retry period.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from kubernetes.dynamic.exceptions import ConflictError, NotFoundError
from prometheus_client import Gauge

from kvpilot_operator.controller.kube import Kube

log = logging.getLogger("kvpilot.leader")

LEASE_NAME = "kvpilot-operator"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
REQUEST_TIMEOUT_S = 5.0  # one Lease call; well under the renew deadline

LEADER = Gauge("kvpilot_operator_leader", "1 while this operator replica holds the Lease and acts.")


def micro_time(now: dt.datetime) -> str:
    """A Lease's MicroTime (RFC 3339 with microseconds)."""
    return now.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def take_or_renew(
    spec: dict[str, Any] | None,
    seen_at: float,
    now: float,
    me: str,
    duration_s: int,
    stamp: str,
) -> dict[str, Any] | None:
    """The Lease spec to write for `me` to hold the Lease, or None while another holder's term
    runs. Pure (client-go's tryAcquireOrRenew without the I/O).

    `seen_at` is when this replica first saw `spec` as it is (its own monotonic clock): another
    holder's term ends `leaseDurationSeconds` after that, whatever renewTime says. A released
    Lease (no holder) is free at once."""
    if spec is None:
        return {
            "holderIdentity": me,
            "leaseDurationSeconds": duration_s,
            "acquireTime": stamp,
            "renewTime": stamp,
            "leaseTransitions": 0,
        }
    holder = spec.get("holderIdentity") or ""
    term = spec.get("leaseDurationSeconds") or duration_s
    if holder and holder != me and now < seen_at + term:
        return None
    new = {**spec, "holderIdentity": me, "leaseDurationSeconds": duration_s, "renewTime": stamp}
    if holder != me:
        new["acquireTime"] = stamp
        new["leaseTransitions"] = (spec.get("leaseTransitions") or 0) + 1
    return new


def lease_namespace() -> str:
    """The operator's own namespace: POD_NAMESPACE (the chart sets it), else, in a pod (where
    `Kube.connect` takes the in-cluster credentials), its service account's, else "default" (a
    local operator, e.g. `kvpilot up`)."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        with contextlib.suppress(OSError):
            return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    return "default"


def replica_identity() -> str:
    """The pod's name (POD_NAME, the chart sets it) or the host's, and a suffix: a restarted
    container is a new candidate, not the old holder back."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


@dataclass
class LeaderElector:
    kube: Kube
    namespace: str
    identity: str
    name: str = LEASE_NAME
    lease_duration: int = 15
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    clock: Callable[[], float] = time.monotonic
    leading: threading.Event = field(default_factory=threading.Event)
    lost: threading.Event = field(default_factory=threading.Event)
    on_lost: Callable[[], None] = lambda: None
    holder: str = ""  # as last seen
    _seen: dict[str, Any] | None = None
    _seen_at: float = 0.0
    _renewed_at: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def where(self) -> str:
        return f"Lease {self.namespace}/{self.name}"

    def try_once(self) -> bool:
        """One attempt to take or renew the Lease; True if this replica holds it now."""
        leases = self.kube.resource("coordination.k8s.io/v1", "Lease")
        try:
            lease = leases.get(
                name=self.name, namespace=self.namespace, _request_timeout=REQUEST_TIMEOUT_S
            ).to_dict()
        except NotFoundError:
            lease = None
        spec = None if lease is None else (lease.get("spec") or {})
        now = self.clock()
        if spec != self._seen:
            self._seen, self._seen_at = spec, now
        self._saw((spec or {}).get("holderIdentity") or "")
        stamp = micro_time(dt.datetime.now(dt.timezone.utc))
        new = take_or_renew(spec, self._seen_at, now, self.identity, self.lease_duration, stamp)
        if new is None:
            return False
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": new,
        }
        try:
            if lease is None:
                leases.create(
                    body=body, namespace=self.namespace, _request_timeout=REQUEST_TIMEOUT_S
                )
            else:
                # The resourceVersion makes this a compare-and-swap: of two candidates, one wins.
                body["metadata"]["resourceVersion"] = lease["metadata"]["resourceVersion"]
                leases.replace(
                    body=body,
                    name=self.name,
                    namespace=self.namespace,
                    _request_timeout=REQUEST_TIMEOUT_S,
                )
        except ConflictError:
            return False  # another candidate wrote first; look again next round
        self._seen, self._seen_at = new, self.clock()
        self._saw(self.identity)
        return True

    def _saw(self, holder: str) -> None:
        if holder != self.holder:
            self.holder = holder
            if holder and holder != self.identity:
                log.info(
                    "%s is held by %s: this replica (%s) waits", self.where, holder, self.identity
                )

    def _round(self) -> None:
        try:
            held = self.try_once()
        except Exception as err:  # the API server unreachable, a timeout: counts as not renewed
            log.warning("%s: %s", self.where, err)
            held = False
        now = self.clock()
        if held:
            self._renewed_at = now
            if not self.leading.is_set():
                log.info("%s acquired: this replica (%s) acts", self.where, self.identity)
                LEADER.set(1)
                self.leading.set()
        elif self.leading.is_set() and (
            (self.holder and self.holder != self.identity)
            or now - self._renewed_at >= self.renew_deadline
        ):
            log.error(
                "%s lost (held by %r now): this replica stops acting", self.where, self.holder
            )
            LEADER.set(0)
            self.lost.set()
            with contextlib.suppress(RuntimeError):  # kopf's loop already closed: nothing to stop
                self.on_lost()

    def _run(self) -> None:
        while not self._stop.is_set() and not self.lost.is_set():
            self._round()
            self._stop.wait(self.retry_period)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kvpilot-leader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop taking part; a holder releases the Lease, so that a follower takes over at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=REQUEST_TIMEOUT_S * 2)
        if self.leading.is_set() and not self.lost.is_set():
            with contextlib.suppress(Exception):
                self._release()
            LEADER.set(0)

    def _release(self) -> None:
        leases = self.kube.resource("coordination.k8s.io/v1", "Lease")
        lease = leases.get(
            name=self.name, namespace=self.namespace, _request_timeout=REQUEST_TIMEOUT_S
        ).to_dict()
        spec = lease.get("spec") or {}
        if spec.get("holderIdentity") != self.identity:
            return
        stamp = micro_time(dt.datetime.now(dt.timezone.utc))
        lease["spec"] = {
            **spec,
            "holderIdentity": "",
            "leaseDurationSeconds": 1,
            "renewTime": stamp,
        }
        leases.replace(
            body=lease, name=self.name, namespace=self.namespace, _request_timeout=REQUEST_TIMEOUT_S
        )
        log.info("%s released by %s", self.where, self.identity)


@contextlib.contextmanager
def standby_health(port: int, elector: LeaderElector) -> Iterator[None]:
    """/healthz on `port` while this replica waits for the Lease: kopf's own endpoint starts with
    kopf, in the holder only, and a follower's liveness probe must pass all the same."""
    if not port:
        yield
        return

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/healthz":
                self.send_error(404)
                return
            body = json.dumps({"leader": False, "holder": elector.holder}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:  # probes every few seconds: not worth a line
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Health)
    thread = threading.Thread(
        target=server.serve_forever, name="kvpilot-standby-health", daemon=True
    )
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()  # kopf's endpoint takes the port over


def run_elected(
    elector: LeaderElector,
    health_port: int,
    operate: Callable[[asyncio.AbstractEventLoop, asyncio.Event], None],
) -> bool:
    """Wait for the Lease (answering /healthz meanwhile), then `operate(loop, stop)` (kopf.run on
    that loop with that stop flag) until it returns: when told to stop, or once the Lease is lost
    (`stop` is set then). Releases a Lease still held. False if the Lease was lost.

    The loop is made here so that losing the Lease can set an asyncio flag from the elector's
    thread: kopf awaits a threading.Event on a thread of asyncio's default executor, which keeps
    `asyncio.run` from returning until the event is set."""
    elector.start()
    try:
        with standby_health(health_port, elector):
            elector.leading.wait()
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        stop = asyncio.Event()
        elector.on_lost = lambda: loop.call_soon_threadsafe(stop.set)
        if elector.lost.is_set():
            return False
        try:
            operate(loop, stop)
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
    finally:
        elector.stop()
    return not elector.lost.is_set()
