"""A stand-in for the Hugging Face Hub on loopback: local folders served over the HTTP file API
huggingface_hub calls (this machine cannot reach the Hub).

Routes, as the Hub answers them: `GET /api/models/{repo}/revision/{rev}` (the commit a branch
names), `GET /api/models/{repo}/tree/{commit}` (files with their git blob sha1, and sha256 for
LFS ones), `HEAD`/`GET /{repo}/resolve/{rev}/{path}` (X-Repo-Commit, ETag, X-Linked-Etag and
X-Linked-Size for LFS files, Range requests). A repo that does not exist is a 401 with
X-Error-Code RepoNotFound, an unknown revision a 404 with RevisionNotFound, as on the Hub.
`corrupt` names files served with one byte flipped (the listing keeps the true checksums).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import re
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LFS_MIN_BYTES = 1 << 20  # the Hub stores large files (and weights) in LFS


@dataclass(eq=False)
class HubFile:
    path: str
    data: bytes
    lfs: bool

    @functools.cached_property
    def blob_sha1(self) -> str:
        return hashlib.sha1(f"blob {len(self.data)}\0".encode() + self.data).hexdigest()

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class HubStandIn:
    repos: dict[str, Path]  # repo id -> a folder, served as its `main` branch
    corrupt: set[str] = field(default_factory=set)
    requests: list[str] = field(default_factory=list)  # "METHOD path", as served
    _cache: dict[Any, list[HubFile]] = field(default_factory=dict, repr=False)

    def files(self, repo: str) -> list[HubFile]:
        root = self.repos[repo]
        paths = sorted(p for p in root.rglob("*") if p.is_file())
        # Read and hashed once per version of the folder, not per request.
        key = (repo, tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths))
        if key not in self._cache:
            out = []
            for p in paths:
                data = p.read_bytes()
                lfs = len(data) >= LFS_MIN_BYTES or p.suffix in (".gguf", ".safetensors")
                out.append(HubFile(str(p.relative_to(root)), data, lfs))
            self._cache[key] = out
        return self._cache[key]

    def commit(self, repo: str) -> str:
        h = hashlib.sha1(repo.encode())
        for f in self.files(repo):
            h.update(f"{f.path}\0{f.blob_sha1}\n".encode())
        return h.hexdigest()


def _handler(hub: HubStandIn) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
            body = json.dumps(obj).encode()
            self._send(status, body, {"Content-Type": "application/json", **(headers or {})})

        def _error(self, status: int, code: str, message: str) -> None:
            self._json(status, {"error": message}, {"X-Error-Code": code})

        def _revision(self, repo: str, rev: str) -> str | None:
            commit = hub.commit(repo)
            return commit if rev in ("main", commit) else None

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            path = urllib.parse.unquote(url.path)
            hub.requests.append(f"{self.command} {path}")
            api = re.fullmatch(r"/api/models/(.+?)/(revision|tree)/([^/]+)/?(.*)", path)
            resolve = re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", path)
            repo = api.group(1) if api else resolve.group(1) if resolve else None
            if repo is None:
                return self._error(404, "EntryNotFound", f"no route {path}")
            if repo not in hub.repos:
                return self._error(401, "RepoNotFound", f"Repository not found: {repo}")
            rev = api.group(3) if api else resolve.group(2)  # type: ignore[union-attr]
            commit = self._revision(repo, rev)
            if commit is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            files = hub.files(repo)
            if api and api.group(2) == "revision":
                siblings = [{"rfilename": f.path} for f in files]
                return self._json(200, {"id": repo, "sha": commit, "siblings": siblings})
            if api:
                return self._json(200, [_tree_entry(f) for f in files])
            name = resolve.group(3)  # type: ignore[union-attr]
            found = next((f for f in files if f.path == name), None)
            if found is None:
                return self._error(404, "EntryNotFound", f"{name} not found")
            data = found.data
            if name in hub.corrupt:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            headers = {
                "X-Repo-Commit": commit,
                "ETag": f'"{found.sha256 if found.lfs else found.blob_sha1}"',
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            if found.lfs:
                headers["X-Linked-Etag"] = f'"{found.sha256}"'
                headers["X-Linked-Size"] = str(len(found.data))
            ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if ranged and self.command == "GET":
                start = int(ranged.group(1))
                end = int(ranged.group(2)) if ranged.group(2) else len(data) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                return self._send(206, data[start : end + 1], headers)
            return self._send(200, data, headers)

    return Handler


def _tree_entry(f: HubFile) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "type": "file",
        "oid": f.blob_sha1,
        "size": len(f.data),
        "path": f.path,
    }
    if f.lfs:
        entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}
    return entry


@contextmanager
def serving(hub: HubStandIn) -> Iterator[str]:
    """The stand-in's endpoint (for HF_ENDPOINT), for as long as the block runs."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="hub-stand-in", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
