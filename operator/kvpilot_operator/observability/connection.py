"""How the operator reaches its Prometheus when that is not a plain `http://` URL on the pod
network: a Thanos or Mimir query frontend, or a Prometheus behind kube-rbac-proxy or an
ingress, wants TLS with a private CA, a bearer token, and often a tenant header
(`X-Scope-OrgID`). The settings become the `requests` session, headers and auth that
prometheus-api-client's `PrometheusConnect` sends every query with.

No settings is plain HTTP as before; an `https://` URL is verified against the system's CAs
unless a CA file is given or verification is explicitly skipped.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
from requests.auth import AuthBase

# Kubernetes projects a fresh service-account token into the file at 80% of its lifetime (an
# hour by default); reading it once a minute follows a rotation long before the old one expires.
TOKEN_REFRESH_S = 60.0


class BearerTokenFile(AuthBase):
    """`Authorization: Bearer <the file's content>`, the file re-read every `refresh_s` seconds
    so that a rotated token is picked up without a restart. A file that cannot be read fails the
    request as a connection problem (the autoscaler holds and says why); once one token was read,
    a failed re-read keeps it (a rotation may replace the file in two steps)."""

    def __init__(self, path: str | Path, refresh_s: float = TOKEN_REFRESH_S) -> None:
        self.path = Path(path)
        self.refresh_s = refresh_s
        self._token: str | None = None
        self._read_at = float("-inf")
        self._lock = threading.Lock()  # the sweep queries from several threads

    def token(self) -> str:
        with self._lock:
            now = time.monotonic()
            if self._token is None or now - self._read_at >= self.refresh_s:
                try:
                    token = self.path.read_text().strip()
                    if not token:
                        raise OSError("the file is empty")
                    self._token, self._read_at = token, now
                except OSError as err:
                    if self._token is None:
                        raise requests.exceptions.RequestException(
                            f"bearer token file {self.path}: {err}"
                        ) from err
            return self._token

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self.token()}"
        return r


def parse_header(text: str) -> tuple[str, str]:
    """`Name: value` (as curl's -H) -> (name, value); ValueError when it is not one."""
    name, sep, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not sep or not name or any(c.isspace() for c in name):
        raise ValueError(f"{text!r} is not a header: expected 'Name: value'")
    if "\n" in value or "\r" in value:
        raise ValueError(f"header {name}: the value spans lines")
    return name, value


@dataclass(frozen=True)
class PrometheusAccess:
    """TLS and authentication for the Prometheus API (`kvpilot operator --prometheus-*`)."""

    ca_file: str = ""
    bearer_token_file: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    insecure_skip_verify: bool = False
    token_refresh_s: float = TOKEN_REFRESH_S

    def __post_init__(self) -> None:
        if self.ca_file and self.insecure_skip_verify:
            raise ValueError("a CA file and skipping TLS verification contradict each other")
        if self.bearer_token_file and any(k.lower() == "authorization" for k in self.headers):
            raise ValueError(
                "an Authorization header and a bearer token file contradict each other"
            )

    def session(self) -> requests.Session:
        s = requests.Session()
        # requests takes a CA bundle path as `verify`; prometheus-api-client passes the
        # session's `verify` on with every request.
        s.verify = False if self.insecure_skip_verify else (self.ca_file or True)
        return s

    def auth(self) -> BearerTokenFile | None:
        if not self.bearer_token_file:
            return None
        return BearerTokenFile(self.bearer_token_file, self.token_refresh_s)
