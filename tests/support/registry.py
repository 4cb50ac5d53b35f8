"""A real OCI registry on loopback (Debian's `docker-registry`, the CNCF distribution
registry), and a minimal push of files as an artifact (one layer per file, named by the
`org.opencontainers.image.title` annotation, as `oras push` stores them)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from kvpilot_operator.local.procs import free_ports

BINARY = shutil.which("docker-registry") or "/usr/bin/docker-registry"


@contextlib.contextmanager
def registry(workdir: Path) -> Iterator[str]:
    """`host:port` of a registry storing under workdir, for as long as the block runs."""
    port = free_ports(1)[0]
    config = workdir / "config.yml"
    config.write_text(
        json.dumps(  # YAML is a superset of JSON
            {
                "version": 0.1,
                "log": {"level": "warn"},
                "storage": {"filesystem": {"rootdirectory": str(workdir / "data")}},
                "http": {"addr": f"127.0.0.1:{port}"},
            }
        )
    )
    log = (workdir / "registry.log").open("wb")
    proc = subprocess.Popen([BINARY, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://{address}/v2/", timeout=1).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"registry did not start: {(workdir / 'registry.log').read_text()}"
                )
            time.sleep(0.1)
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def _put_blob(base: str, repo: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    start = httpx.post(f"{base}/v2/{repo}/blobs/uploads/", timeout=30)
    start.raise_for_status()
    location = start.headers["Location"]
    if location.startswith("/"):
        location = base + location
    sep = "&" if "?" in location else "?"
    put = httpx.put(
        f"{location}{sep}digest={digest}",
        content=data,
        headers={"Content-Type": "application/octet-stream"},
        timeout=300,
    )
    put.raise_for_status()
    return digest


def push_files(address: str, repo: str, tag: str, files: dict[str, bytes]) -> str:
    """Push `files` as an artifact; returns the manifest's digest."""
    base = f"http://{address}"
    config = b"{}"
    layers = [
        {
            "mediaType": "application/octet-stream",
            "digest": _put_blob(base, repo, data),
            "size": len(data),
            "annotations": {"org.opencontainers.image.title": name},
        }
        for name, data in files.items()
    ]
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": "application/vnd.kvpilot.model.v1",
            "config": {
                "mediaType": "application/vnd.oci.empty.v1+json",
                "digest": _put_blob(base, repo, config),
                "size": len(config),
            },
            "layers": layers,
        }
    ).encode()
    r = httpx.put(
        f"{base}/v2/{repo}/manifests/{tag}",
        content=manifest,
        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        timeout=30,
    )
    r.raise_for_status()
    return "sha256:" + hashlib.sha256(manifest).hexdigest()
