"""pvc://claim[/path]: a claim mounted at `$KVPILOT_PVC_ROOT/claim` (default /mnt/pvc), copied
into the destination (the operator serves `pvc://` sources straight from the mounted claim; this
is for copying one into a faster local cache)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from kvpilot_engine.sources.base import (
    Fetched,
    SourceError,
    SourceURI,
    check_weights,
    read_manifest,
)
from kvpilot_engine.sources.progress import Progress

PVC_ROOT_ENV = "KVPILOT_PVC_ROOT"


def fetch_pvc(
    src: SourceURI, dest: Path, progress: Progress, *, revision: str | None = None
) -> Fetched:
    uri = str(src)
    root = Path(os.environ.get(PVC_ROOT_ENV, "/mnt/pvc")) / src.location
    if not root.is_dir():
        raise SourceError("NotFound", f"{uri}: claim {src.location!r} is not mounted at {root}")
    origin = root / src.path
    if not origin.exists():
        raise SourceError("NotFound", f"{uri}: {src.path!r} does not exist in the claim")
    paths = [origin] if origin.is_file() else sorted(p for p in origin.rglob("*") if p.is_file())
    names = {p.name if origin.is_file() else str(p.relative_to(origin)): p for p in paths}
    check_weights(uri, list(names))
    files = {
        n: {"size": p.stat().st_size, "mtime": int(p.stat().st_mtime)} for n, p in names.items()
    }
    listing = "\n".join(f"{n}\t{e['size']}\t{e['mtime']}" for n, e in sorted(files.items()))
    pinned = hashlib.sha256(listing.encode()).hexdigest()[:40]
    if revision and revision != pinned:
        raise SourceError("RevisionMismatch", f"{uri}: changed since revision {revision}")
    before = read_manifest(dest)
    if before is not None and before.uri == uri and before.revision == pinned:
        return Fetched(uri=uri, revision=pinned, files=files)
    progress.start(sum(e["size"] for e in files.values()), len(files), pinned)
    try:
        for name, path in names.items():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    finally:
        progress.stop()
    return Fetched(uri=uri, revision=pinned, files=files, downloaded_bytes=progress.total)
