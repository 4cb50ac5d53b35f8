"""hf://org/repo[@revision]: the Hugging Face Hub through huggingface_hub (`HF_ENDPOINT`,
`HF_TOKEN`), into a folder (`kvpilot download`) or the Hub's cache (`kvpilot serve org/repo`)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from kvpilot_engine.sources.base import (
    Fetched,
    SourceError,
    SourceURI,
    check_weights,
    endpoint_hint,
    hash_file,
    read_manifest,
)
from kvpilot_engine.sources.progress import Progress

# With safetensors in a repo, its other formats are copies of the same weights: vLLM skips
# them too (the pickled ones would not load here anyway).
SKIPPED_WITH_SAFETENSORS = (".bin", ".pt", ".pth", ".h5", ".msgpack", ".ot", ".onnx")


def _classify(repo: str, revision: str, err: Exception) -> SourceError:
    """The Hub client's exceptions, as a reason and a message a user acts on."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(err, SourceError):
        return err
    if isinstance(err, GatedRepoError):
        return SourceError(
            "Unauthorized", f"hf://{repo} is gated: set HF_TOKEN to a token with access"
        )
    if isinstance(err, RepositoryNotFoundError):
        return SourceError(
            "NotFound",
            f"hf://{repo}: repository not found (or private: set HF_TOKEN)",
        )
    if isinstance(err, RevisionNotFoundError):
        return SourceError("NotFound", f"hf://{repo}: revision {revision!r} not found")
    if isinstance(err, HfHubHTTPError):
        status = err.response.status_code if err.response is not None else "?"
        reason = "Unauthorized" if status in (401, 403) else "Unreachable"
        return SourceError(reason, f"hf://{repo}: the Hub answered {status}")
    # Connection refused, DNS, timeouts (httpx's errors; OSError below them).
    return SourceError(
        "Unreachable",
        f"hf://{repo}: cannot reach the Hub at {endpoint_hint('hf')}: {type(err).__name__}: {err}",
    )


def _git_blob_sha1(path: Path) -> str:
    return hash_file(path, hashlib.sha1(f"blob {path.stat().st_size}\0".encode())).hexdigest()


def _sha256(path: Path) -> str:
    return hash_file(path, hashlib.sha256()).hexdigest()


def resolve(repo: str, revision: str | None) -> tuple[str, dict[str, dict[str, Any]]]:
    """The commit `revision` (default main) names, and the files there: name -> size and the
    checksum the Hub publishes (sha256 for LFS files, git's blob sha1 for the others)."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi()
    wanted = revision or "main"
    try:
        commit = api.repo_info(repo, revision=wanted).sha
        assert commit is not None
        tree = [
            f
            for f in api.list_repo_tree(repo, revision=commit, recursive=True)
            if isinstance(f, RepoFile)
        ]
    except Exception as err:
        raise _classify(repo, wanted, err) from err
    files: dict[str, dict[str, Any]] = {}
    for f in tree:
        entry: dict[str, Any] = {"size": f.size}
        if f.lfs is not None:
            entry["sha256"] = f.lfs.sha256
        else:
            entry["gitSha1"] = f.blob_id
        files[f.path] = entry
    if any(n.endswith(".safetensors") for n in files):
        files = {n: e for n, e in files.items() if not n.lower().endswith(SKIPPED_WITH_SAFETENSORS)}
    return commit, files


def verify(root: Path, files: dict[str, dict[str, Any]], uri: str) -> None:
    """Every file against its published checksum; a bad one is removed (a retry fetches it
    again) and reported."""
    for name, entry in sorted(files.items()):
        path = root / name
        if "sha256" in entry:
            got, want, kind = _sha256(path), entry["sha256"], "sha256"
        else:
            got, want, kind = _git_blob_sha1(path), entry["gitSha1"], "git blob sha1"
        if got != want:
            path.unlink(missing_ok=True)
            raise SourceError(
                "ChecksumMismatch",
                f"{uri}: {name}: {kind} {got} is not the published {want} (removed; run again)",
            )


def fetch_hub(
    src: SourceURI, dest: Path, progress: Progress, *, revision: str | None = None
) -> Fetched:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # our JSON progress lines instead of tqdm's in the pod's log

    repo = src.location
    # A pinned revision (`--revision`, vLLM's flag) wins over the URI's.
    commit, files = resolve(repo, revision or src.revision)
    check_weights(f"hf://{repo}@{commit}", list(files))
    uri = f"hf://{repo}"
    before = read_manifest(dest)
    if (
        before is not None
        and before.uri == uri
        and before.revision == commit
        and all(
            (dest / n).is_file() and (dest / n).stat().st_size == e["size"]
            for n, e in files.items()
        )
    ):
        return Fetched(uri=uri, revision=commit, files=files)
    progress.start(sum(e["size"] for e in files.values()), len(files), commit)
    try:
        # Resumable: the client keeps partial files under dest/.cache/huggingface and continues
        # them with a Range request.
        snapshot_download(
            repo, revision=commit, local_dir=dest, allow_patterns=sorted(files), max_workers=4
        )
    except Exception as err:
        raise _classify(repo, commit, err) from err
    finally:
        progress.stop()
    verify(dest, files, f"hf://{repo}@{commit}")
    return Fetched(uri=uri, revision=commit, files=files, downloaded_bytes=progress.total)


def snapshot_to_cache(repo: str, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """`kvpilot serve org/repo`: into the Hub's cache (`HF_HOME`, or `--download-dir`) as vLLM
    does, verified; a second start reuses it."""
    from huggingface_hub import snapshot_download

    commit, files = resolve(repo, revision)
    check_weights(f"hf://{repo}@{commit}", list(files))
    try:
        path = Path(
            snapshot_download(
                repo, revision=commit, cache_dir=cache_dir, allow_patterns=sorted(files)
            )
        )
    except Exception as err:
        raise _classify(repo, commit, err) from err
    verify(path, files, f"hf://{repo}@{commit}")
    return path
