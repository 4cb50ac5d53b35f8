"""oci://registry[:port]/repository[:tag|@sha256:digest]: model files stored in an OCI registry
as an artifact (ORAS's layout: one layer per file, named by its `org.opencontainers.image.title`
annotation), through the registry's HTTP API (OCI distribution spec).

The revision is the manifest's digest; every blob is checked against its own sha256 digest.
Credentials: `OCI_USERNAME` and `OCI_PASSWORD` (basic auth, or exchanged for a bearer token when
the registry asks for one). Registries on loopback, and those listed in `KVPILOT_OCI_PLAIN_HTTP`
(comma-separated host[:port]), are spoken to over plain HTTP; others over HTTPS."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from kvpilot_engine.sources.base import (
    CHUNK,
    OCI_REFERENCE,
    Fetched,
    SourceError,
    SourceURI,
    check_weights,
    hash_file,
    read_manifest,
)
from kvpilot_engine.sources.progress import Progress

TITLE = "org.opencontainers.image.title"
MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
PARTIAL = ".partial"


def split_reference(src: SourceURI) -> tuple[str, str, str]:
    """(registry, repository, tag or digest) of an oci:// URI."""
    ref = f"{src.location}/{src.path}" if src.path else src.location
    m = OCI_REFERENCE.match(ref)
    if m is None:
        raise SourceError("InvalidURI", f"oci://{ref}: expected oci://registry/repository[:tag]")
    return m["registry"], m["repo"], m["digest"] or m["tag"] or "latest"


def _base_url(registry: str) -> str:
    host = registry.split(":", 1)[0]
    plain = {r.strip() for r in os.environ.get("KVPILOT_OCI_PLAIN_HTTP", "").split(",")}
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    return f"{'http' if loopback or registry in plain else 'https'}://{registry}"


class Registry:
    """The few calls of the distribution API a pull needs, with its token dance."""

    def __init__(self, registry: str, repo: str, uri: str) -> None:
        import httpx

        self.uri, self.repo = uri, repo
        self.base = _base_url(registry)
        user, password = os.environ.get("OCI_USERNAME"), os.environ.get("OCI_PASSWORD")
        self.basic = (user, password) if user and password else None
        self.client = httpx.Client(follow_redirects=True, timeout=httpx.Timeout(30.0, read=300.0))
        self.token: str | None = None

    def _headers(self, extra: dict[str, str]) -> dict[str, str]:
        return {**extra, **({"Authorization": f"Bearer {self.token}"} if self.token else {})}

    def _authenticate(self, challenge: str) -> None:
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        if not challenge.lower().startswith("bearer") or "realm" not in params:
            raise SourceError("Unauthorized", f"{self.uri}: the registry refused the credentials")
        query = {k: v for k, v in params.items() if k in ("service", "scope")}
        query.setdefault("scope", f"repository:{self.repo}:pull")
        r = self.client.get(params["realm"], params=query, auth=self.basic)
        if r.status_code != 200:
            raise SourceError("Unauthorized", f"{self.uri}: token request answered {r.status_code}")
        body = r.json()
        self.token = body.get("token") or body.get("access_token")

    def get(self, path: str, headers: dict[str, str] | None = None, stream: bool = False) -> Any:
        import httpx

        url = f"{self.base}/v2/{self.repo}/{path}"
        try:
            for attempt in range(2):
                req = self.client.build_request("GET", url, headers=self._headers(headers or {}))
                r = self.client.send(req, stream=stream, auth=None if self.token else self.basic)
                if r.status_code == 401 and self.token is None and attempt == 0:
                    challenge = r.headers.get("WWW-Authenticate", "")
                    r.close()
                    self._authenticate(challenge)
                    continue
                break
        except httpx.HTTPError as e:
            raise SourceError("Unreachable", f"{self.uri}: cannot reach {self.base}: {e}") from e
        if r.status_code in (401, 403):
            raise SourceError("Unauthorized", f"{self.uri}: the registry answered {r.status_code}")
        if r.status_code == 404:
            raise SourceError("NotFound", f"{self.uri}: {path.split('/')[0]} not found")
        if r.status_code >= 400:
            raise SourceError("Unreachable", f"{self.uri}: the registry answered {r.status_code}")
        return r


def fetch_oci(
    src: SourceURI, dest: Path, progress: Progress, *, revision: str | None = None
) -> Fetched:
    registry, repo, ref = split_reference(src)
    uri = f"oci://{registry}/{repo}"
    reg = Registry(registry, repo, f"oci://{registry}/{repo}:{ref}")
    r = reg.get(f"manifests/{revision or ref}", {"Accept": MANIFEST_TYPES})
    digest = "sha256:" + hashlib.sha256(r.content).hexdigest()
    if ref.startswith("sha256:") and digest != ref:
        raise SourceError(
            "ChecksumMismatch", f"{uri}: the manifest's digest is {digest}, not {ref}"
        )
    if revision and digest != revision:
        raise SourceError("RevisionMismatch", f"{uri}:{ref} is now {digest}, not {revision}")
    manifest = r.json()
    files: dict[str, dict[str, Any]] = {}
    for layer in manifest.get("layers") or []:
        name = (layer.get("annotations") or {}).get(TITLE)
        if not name:
            raise SourceError(
                "NoWeights",
                f"{uri}@{digest}: a layer ({layer.get('mediaType')}) has no file name "
                f"({TITLE}); push the model as an artifact (e.g. `oras push`)",
            )
        if name.startswith("/") or ".." in name.split("/"):
            raise SourceError("InvalidURI", f"{uri}@{digest}: unsafe file name {name!r}")
        files[name] = {"size": int(layer["size"]), "digest": layer["digest"]}
    check_weights(f"{uri}@{digest}", list(files))
    before = read_manifest(dest)
    done = set()
    if before is not None and before.uri == uri and before.revision == digest:
        done = {n for n in files if (dest / n).is_file()}
    if len(done) == len(files):
        return Fetched(uri=uri, revision=digest, files=files)
    progress.start(sum(f["size"] for f in files.values()), len(files), digest)
    fetched = 0
    try:
        for name, entry in sorted(files.items()):
            if name in done:
                continue
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            _get_blob(reg, entry, target, uri)
            fetched += entry["size"]
    finally:
        progress.stop()
    return Fetched(uri=uri, revision=digest, files=files, downloaded_bytes=fetched)


def _get_blob(reg: Registry, entry: dict[str, Any], target: Path, uri: str) -> None:
    """One blob, continued from a partial file with a Range request, checked against its
    digest (a bad file is removed)."""
    partial = target.with_name(target.name + PARTIAL)
    have = partial.stat().st_size if partial.exists() else 0
    if have > entry["size"]:
        partial.unlink()
        have = 0
    if have < entry["size"]:
        headers = {"Range": f"bytes={have}-"} if have else {}
        r = reg.get(f"blobs/{entry['digest']}", headers, stream=True)
        try:
            mode = "ab" if r.status_code == 206 else "wb"  # a registry may ignore the Range
            with partial.open(mode) as f:
                for chunk in r.iter_bytes(CHUNK):
                    f.write(chunk)
        finally:
            r.close()
    got = "sha256:" + hash_file(partial, hashlib.sha256()).hexdigest()
    if got != entry["digest"]:
        partial.unlink(missing_ok=True)
        raise SourceError(
            "ChecksumMismatch",
            f"{uri}: {target.name}: {got} is not the layer's digest {entry['digest']} "
            "(removed; run again)",
        )
    partial.replace(target)
