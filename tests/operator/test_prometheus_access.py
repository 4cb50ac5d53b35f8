"""The autoscaler reaching a Prometheus behind TLS and authentication, as a Thanos or Mimir query
frontend or kube-rbac-proxy puts it: real HTTPS on loopback with a throwaway CA, a bearer token
that rotates, and a tenant header, in front of the real local Prometheus.

The gateway is a stand-in (a small HTTPS reverse proxy in this module): Prometheus 2.42's own web
config can serve TLS and basic auth, but it checks neither bearer tokens nor tenant headers.
"""

from __future__ import annotations

import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kvpilot_operator.autoscaler.decision import Observation, ScalingParams
from kvpilot_operator.local.pki import generate_pki
from kvpilot_operator.local.prometheus import LocalPrometheus
from kvpilot_operator.observability.connection import (
    BearerTokenFile,
    PrometheusAccess,
    parse_header,
)
from kvpilot_operator.observability.prometheus import PrometheusSource
from prometheus_client import CollectorRegistry, Gauge

from tests.support.metrics import serving

TENANT = ("X-Scope-OrgID", "tenant-a")


# --- no network ---------------------------------------------------------------------------------


def test_header_parsing() -> None:
    assert parse_header("X-Scope-OrgID: tenant-a") == TENANT
    assert parse_header("X-Scope-OrgID:tenant-a:b") == ("X-Scope-OrgID", "tenant-a:b")
    for bad in ("X-Scope-OrgID", ": v", "Bad Name: v"):
        with pytest.raises(ValueError):
            parse_header(bad)


def test_operator_flags() -> None:
    from kvpilot_engine.cli import build_parser

    base = ["operator", "--prometheus-url", "https://thanos.monitoring:9091"]
    ns = build_parser().parse_args(base)
    # No flags: plain settings, as `kvpilot up` has always run.
    assert (ns.prometheus_ca_file, ns.prometheus_bearer_token_file) == ("", "")
    assert ns.prometheus_header is None and ns.prometheus_insecure_skip_verify is False
    ns = build_parser().parse_args(
        [
            *base,
            "--prometheus-ca-file=/etc/prometheus/ca.crt",
            "--prometheus-bearer-token-file=/var/run/secrets/kubernetes.io/serviceaccount/token",
            "--prometheus-header", "X-Scope-OrgID: tenant-a",
            "--prometheus-header", "X-Extra: 1",
        ]
    )  # fmt: skip
    assert ns.prometheus_header == [TENANT, ("X-Extra", "1")]
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--prometheus-header", "no-colon"])
    with pytest.raises(ValueError, match="contradict"):
        PrometheusAccess(ca_file="/ca.crt", insecure_skip_verify=True)
    with pytest.raises(ValueError, match="contradict"):
        PrometheusAccess(bearer_token_file="/t", headers={"authorization": "Bearer x"})


def test_defaults_verify_https_and_send_nothing_extra() -> None:
    access = PrometheusAccess()
    assert access.session().verify is True and access.auth() is None
    assert PrometheusAccess(ca_file="/ca.crt").session().verify == "/ca.crt"
    assert PrometheusAccess(insecure_skip_verify=True).session().verify is False


def test_token_file_is_reread_after_refresh(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("one\n")
    auth = BearerTokenFile(path, refresh_s=0.2)
    assert auth.token() == "one"
    path.write_text("two")
    assert auth.token() == "one"  # within the refresh period
    time.sleep(0.25)
    assert auth.token() == "two"
    path.unlink()  # mid-rotation: the last token stays
    time.sleep(0.25)
    assert auth.token() == "two"


# --- a real HTTPS gateway in front of a real Prometheus ----------------------------------------


@dataclass
class Gateway:
    """An HTTPS reverse proxy that admits only `Authorization: Bearer <token>` with the tenant
    header, as a multi-tenant query frontend does, and forwards to the Prometheus."""

    upstream: str
    cert: Path
    key: Path
    token: str = "first"
    seen: list[dict[str, str]] = field(default_factory=list)
    port: int = 0

    def start(self) -> None:
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def _proxy(self) -> None:
                gateway.seen.append(dict(self.headers))
                if self.headers.get("Authorization") != f"Bearer {gateway.token}":
                    return self._reply(401, b'{"status":"error","error":"bad token"}')
                if self.headers.get(TENANT[0]) != TENANT[1]:
                    return self._reply(401, b'{"status":"error","error":"no org id"}')
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                req = urllib.request.Request(
                    gateway.upstream + self.path, data=body, method=self.command
                )
                if body:
                    req.add_header("Content-Type", self.headers["Content-Type"])
                try:
                    with urllib.request.urlopen(req, timeout=10) as resp:
                        self._reply(resp.status, resp.read())
                except urllib.error.HTTPError as e:
                    self._reply(e.code, e.read())

            do_GET = do_POST = _proxy

            def _reply(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    @property
    def url(self) -> str:
        # The local PKI's serving certificate names 127.0.0.1 and localhost.
        return f"https://localhost:{self.port}"


@pytest.fixture(scope="module")
def engine_target() -> Iterator[str]:
    """A /metrics endpoint standing for one engine: the autoscaler counts it as a target up."""
    registry = CollectorRegistry()
    Gauge("kvpilot_test_engine", "Stands for an engine.", registry=registry).set(1)
    with serving(registry) as target:
        yield target


@pytest.fixture(scope="module")
def gateway(engine_target: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    pki = generate_pki(tmp_path_factory.mktemp("pki"))
    labels = {
        "namespace": "ns1",
        "kvpilot_io_llmservice": "chat",
        "app_kubernetes_io_component": "engine",
    }
    with LocalPrometheus(scrape_interval=1.0) as prom:
        prom.set_targets([(engine_target, labels)])
        prom.wait_for_series('up{kvpilot_io_llmservice="chat"} == 1', timeout=30)
        gw = Gateway(prom.url, pki["apiserver.crt"], pki["apiserver.key"])
        gw.start()
        gw.ca = pki["ca.crt"]  # type: ignore[attr-defined]
        try:
            yield gw
        finally:
            gw.stop()


def observe(source: PrometheusSource) -> Observation:
    obs, _ = source.observe(
        "ns1", "chat", ScalingParams(), now=0.0, replicas=1, ready=1, slo_window=60.0
    )
    return obs


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_tls_bearer_token_and_tenant_header(gateway: Gateway, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first\n")
    ca = str(gateway.ca)  # type: ignore[attr-defined]
    access = PrometheusAccess(
        ca_file=ca, bearer_token_file=str(token), headers=dict([TENANT]), token_refresh_s=0.5
    )
    source = PrometheusSource(gateway.url, access=access, timeout=5)
    obs = observe(source)
    # Not missing: Prometheus counted the engine's target up, through the gateway.
    assert obs.missing is None, obs.missing
    assert obs.short is not None and obs.long is not None
    last = gateway.seen[-1]
    assert last["Authorization"] == "Bearer first" and last[TENANT[0]] == TENANT[1]

    # The token rotates: the gateway takes only the new one, the file gets it, and within the
    # refresh period the operator follows without a restart.
    gateway.token = "second"
    token.write_text("second\n")
    time.sleep(0.6)
    obs = observe(source)
    assert obs.missing is None, obs.missing
    assert gateway.seen[-1]["Authorization"] == "Bearer second"

    # No tenant header: refused, and the autoscaler holds, saying so.
    no_tenant = PrometheusAccess(ca_file=ca, bearer_token_file=str(token))
    obs = observe(PrometheusSource(gateway.url, access=no_tenant))
    assert obs.missing is not None and obs.missing[0] == "PrometheusError"
    assert "401" in obs.missing[1] or "org id" in obs.missing[1]

    # Skipping verification reaches it without the CA.
    insecure = PrometheusAccess(
        insecure_skip_verify=True, bearer_token_file=str(token), headers=dict([TENANT])
    )
    assert observe(PrometheusSource(gateway.url, access=insecure)).missing is None


@pytest.mark.slow
def test_untrusted_certificate_and_missing_token_are_reported(
    gateway: Gateway, tmp_path: Path
) -> None:
    # The system's CAs do not know the throwaway CA: a TLS failure, not a silent success.
    seen = len(gateway.seen)
    plain = PrometheusSource(gateway.url, access=PrometheusAccess(headers=dict([TENANT])))
    obs = observe(plain)
    assert obs.missing is not None and obs.missing[0] == "PrometheusUnreachable"
    assert not any(r.get("Authorization") for r in gateway.seen[seen:]), "sent before TLS held"
    missing = PrometheusAccess(
        ca_file=str(gateway.ca),  # type: ignore[attr-defined]
        bearer_token_file=str(tmp_path / "absent"),
        headers=dict([TENANT]),
    )
    obs = observe(PrometheusSource(gateway.url, access=missing))
    assert obs.missing is not None and obs.missing[0] == "PrometheusUnreachable"
    assert "bearer token file" in obs.missing[1]
