"""Model sources: `kvpilot download URI DEST` and `kvpilot serve org/repo`.

A source URI names weights somewhere else; `download` copies them into a local folder the engine
loads, pinned to one revision (written next to the files, in `.kvpilot-source.json`, so every
replica that reads the folder serves the same weights), resumable (a second run fetches only
what is missing or partial) and checked against the checksums the source publishes:

- `hf://org/repo[@revision]`: the Hugging Face Hub (`HF_ENDPOINT`, `HF_TOKEN`); the revision (a
  branch, tag or commit, default `main`) resolves to a commit sha; LFS files are checked against
  their sha256, the others against their git blob sha1.
- `s3://bucket[/prefix]`: S3 or an S3-compatible store, with the standard AWS environment
  (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, ...); the revision is a hash of the
  listing (keys, sizes, ETags, version ids), objects are fetched by version id where the bucket
  keeps versions, and single-part ETags (an MD5) are checked.
- `pvc://claim/path`: a claim mounted under `KVPILOT_PVC_ROOT` (default `/mnt/pvc`), copied.
- `oci://registry/repository[:tag|@digest]`: an OCI artifact (one layer per file, as `oras push`
  stores them); the revision is the manifest digest, every blob checked against its digest.

No torch here: the download init container and `kvpilot download` stay light.
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

from kvpilot_engine.sources.base import (
    MANIFEST,
    REPO_ID,
    SCHEMES,
    WEIGHT_SUFFIXES,
    Fetched,
    SourceError,
    SourceURI,
    parse_uri,
    read_manifest,
)

__all__ = [
    "MANIFEST",
    "REPO_ID",
    "SCHEMES",
    "WEIGHT_SUFFIXES",
    "Fetched",
    "SourceError",
    "SourceURI",
    "download",
    "parse_uri",
    "read_manifest",
]


def download(
    uri: str, dest: str | Path, *, revision: str | None = None, log_interval: float = 5.0
) -> Fetched:
    """Fetch `uri` into `dest`, pinned, verified and resumable; returns the manifest written.

    `revision` pins what the URI may resolve to (a Hub commit, branch or tag; an S3 or PVC
    listing hash a previous download reported): a source that has moved on is a
    RevisionMismatch, not other weights."""
    src = parse_uri(uri)
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    # Replicas sharing a cache (a ReadWriteMany claim) take turns: the first downloads, the
    # others then find its manifest and reuse the files.
    with (out / ".kvpilot-lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _download(src, out, revision, log_interval)


def _download(src: SourceURI, out: Path, revision: str | None, log_interval: float) -> Fetched:
    from kvpilot_engine.sources.progress import Progress

    progress = Progress(str(src), out, interval=log_interval)
    if src.scheme == "hf":
        from kvpilot_engine.sources.hub import fetch_hub

        fetched = fetch_hub(src, out, progress, revision=revision)
    elif src.scheme == "s3":
        from kvpilot_engine.sources.s3 import fetch_s3

        fetched = fetch_s3(src, out, progress, revision=revision)
    elif src.scheme == "oci":
        from kvpilot_engine.sources.oci import fetch_oci

        fetched = fetch_oci(src, out, progress, revision=revision)
    else:
        from kvpilot_engine.sources.pvc import fetch_pvc

        fetched = fetch_pvc(src, out, progress, revision=revision)
    tmp = out / (MANIFEST + ".tmp")
    manifest = {"uri": fetched.uri, "revision": fetched.revision, "files": fetched.files}
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    tmp.replace(out / MANIFEST)
    progress.done(fetched)
    return fetched
