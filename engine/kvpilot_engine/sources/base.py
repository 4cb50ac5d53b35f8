"""What every source shares: URIs, the manifest written next to the files, the errors."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = ".kvpilot-source.json"
CHUNK = 1 << 20  # read and write model files a MiB at a time (they run to gigabytes)
SCHEMES = ("hf", "s3", "pvc", "oci")
# What the engine loads (loader.py): Hugging Face safetensors folders and GGUF files.
WEIGHT_SUFFIXES = (".safetensors", ".gguf")
# A Hub repo id: [namespace/]name, as the Hub validates it.
REPO_ID = re.compile(r"^([A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# registry[:port]/repository[:tag][@sha256:digest], as registries accept them.
OCI_REFERENCE = re.compile(
    r"^(?P<registry>[a-zA-Z0-9.-]+(:[0-9]+)?)/(?P<repo>[a-z0-9]+([._/-][a-z0-9]+)*)"
    r"(:(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(@(?P<digest>sha256:[a-f0-9]{64}))?$"
)


def source_uri(ref: str) -> str | None:
    """The source URI a model or adapter reference names: a URI as it is, `hf://org/repo` for a
    Hub repo id that is not a local path (as vLLM takes one); None for a local path (or a name
    the loader explains)."""
    if "://" in ref:
        return ref
    if "/" in ref and REPO_ID.match(ref) and not os.path.exists(os.path.expanduser(ref)):
        return f"hf://{ref}"
    return None


def cache_folder(uri: str, root: str) -> Path:
    """A download's folder under `root`: one per URI, so a changed URI never reuses another's
    files and the same URI is found again by the next run."""
    return Path(os.path.expanduser(root)) / hashlib.sha256(uri.encode()).hexdigest()[:16]


def hash_file(path: Path, h: Any) -> Any:
    """`h` (a hashlib object) updated with the file's bytes, a chunk at a time."""
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h


class SourceError(Exception):
    """A model source that cannot be fetched, with a CamelCase reason: InvalidURI,
    UnknownScheme, NotFound, Unauthorized, Unreachable, ChecksumMismatch, RevisionMismatch,
    NoWeights."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SourceURI:
    scheme: str
    location: str  # the Hub repo id, the bucket, the claim
    path: str = ""  # the S3 prefix, the path inside the claim
    revision: str | None = None  # hf only: a branch, tag or commit

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        path = f"/{self.path}" if self.path else ""
        return f"{self.scheme}://{self.location}{rev}{path}"


def parse_uri(uri: str) -> SourceURI:
    """Parse and check a source URI (SourceError InvalidURI / UnknownScheme)."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise SourceError("InvalidURI", f"{uri!r} is not a source URI (scheme://...)")
    if scheme not in SCHEMES:
        raise SourceError(
            "UnknownScheme",
            f"{uri!r}: unknown scheme {scheme!r}; kvpilot downloads from "
            + ", ".join(f"{s}://" for s in SCHEMES),
        )
    rest = rest.strip("/")
    if scheme == "hf":
        repo, _, revision = rest.partition("@")
        if not REPO_ID.match(repo) or (_ and not revision):
            raise SourceError("InvalidURI", f"{uri!r}: expected hf://org/repo[@revision]")
        return SourceURI("hf", repo, revision=revision or None)
    if scheme == "oci" and not OCI_REFERENCE.match(rest):
        raise SourceError("InvalidURI", f"{uri!r}: expected oci://registry/repository[:tag]")
    location, _, path = rest.partition("/")
    if scheme == "s3" and not S3_BUCKET.match(location):
        raise SourceError("InvalidURI", f"{uri!r}: expected s3://bucket[/prefix]")
    if scheme == "pvc" and (not DNS_LABEL.match(location) or ".." in path.split("/")):
        raise SourceError("InvalidURI", f"{uri!r}: expected pvc://claim[/path] (no ..)")
    return SourceURI(scheme, location, path)


@dataclass
class Fetched:
    """What `download` wrote: the manifest next to the files."""

    uri: str
    revision: str
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> size, checksums
    downloaded_bytes: int = 0  # this run (0: everything was there already)

    @property
    def total_bytes(self) -> int:
        return sum(int(f.get("size", 0)) for f in self.files.values())

    def summary(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "revision": self.revision,
            "files": len(self.files),
            "bytes": self.total_bytes,
            "downloadedBytes": self.downloaded_bytes,
        }


def endpoint_hint(scheme: str) -> str:
    """Where a scheme's requests go, for error messages."""
    if scheme == "hf":
        from huggingface_hub import constants  # HF_ENDPOINT, as the client read it

        return constants.ENDPOINT
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def read_manifest(dest: Path) -> Fetched | None:
    try:
        raw = json.loads((dest / MANIFEST).read_text())
        return Fetched(uri=raw["uri"], revision=raw["revision"], files=raw.get("files") or {})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_weights(uri: str, names: list[str]) -> None:
    if not any(n.lower().endswith(WEIGHT_SUFFIXES) for n in names):
        shown = ", ".join(sorted(names)[:8]) or "nothing"
        raise SourceError(
            "NoWeights",
            f"{uri} holds no weights the engine loads (*.safetensors or *.gguf); found: {shown}",
        )
