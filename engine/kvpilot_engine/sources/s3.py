"""s3://bucket[/prefix]: S3 and S3-compatible stores through boto3, configured by the standard AWS
environment (`AWS_ENDPOINT_URL` or `AWS_ENDPOINT_URL_S3`, `AWS_REGION`, credentials from
`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, a web identity, or an instance profile)."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

from kvpilot_engine.sources.base import (
    CHUNK,
    Fetched,
    SourceError,
    SourceURI,
    check_weights,
    endpoint_hint,
    hash_file,
    read_manifest,
)
from kvpilot_engine.sources.progress import Progress

PARTIAL = ".partial"  # a file being downloaded: dest/name.partial, resumed with a Range request


def _client() -> Any:
    import boto3
    from botocore.config import Config

    # boto3 reads AWS_ENDPOINT_URL(_S3) and AWS_REGION itself; retries cover a flaky store.
    return boto3.client("s3", config=Config(retries={"max_attempts": 5, "mode": "standard"}))


def _classify(uri: str, err: Exception) -> SourceError:
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
    )

    if isinstance(err, SourceError):
        return err
    if isinstance(err, NoCredentialsError):
        return SourceError("Unauthorized", f"{uri}: no AWS credentials (AWS_ACCESS_KEY_ID, ...)")
    if isinstance(err, EndpointConnectionError):
        return SourceError("Unreachable", f"{uri}: cannot reach {endpoint_hint('s3')}: {err}")
    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket", "NoSuchKey", "404") or status == 404:
            return SourceError("NotFound", f"{uri}: {code or 'not found'}")
        if status in (401, 403) or code in ("AccessDenied", "InvalidAccessKeyId"):
            return SourceError("Unauthorized", f"{uri}: {code} (check the AWS credentials)")
        if code == "PreconditionFailed":
            return SourceError(
                "RevisionMismatch", f"{uri}: an object changed while it was downloaded; run again"
            )
        return SourceError("Unreachable", f"{uri}: {code}: {err}")
    return SourceError("Unreachable", f"{uri}: cannot reach {endpoint_hint('s3')}: {err}")


def _listing(client: Any, bucket: str, prefix: str) -> dict[str, dict[str, Any]]:
    """name (relative to the prefix) -> size, etag, versionId. A prefix naming one object (a
    .gguf file) is that object; otherwise it is a folder."""
    objects: dict[str, dict[str, Any]] = {}
    folder = prefix if not prefix or prefix.endswith("/") else prefix + "/"
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    for page in pages:
        for obj in page.get("Contents") or []:
            key = obj["Key"]
            if key == prefix:
                name = key.rsplit("/", 1)[-1]
            elif key.startswith(folder) and not key.endswith("/"):
                name = key[len(folder) :]
            else:  # prefix "m/smol" also lists "m/smollm"; and folder markers
                continue
            objects[name] = {
                "key": key,
                "size": obj["Size"],
                "etag": obj["ETag"].strip('"'),
            }
    if prefix in {o["key"] for o in objects.values()}:
        objects = {n: o for n, o in objects.items() if o["key"] == prefix}
    return objects


def _revision(objects: dict[str, dict[str, Any]]) -> str:
    lines = sorted(
        f"{o['key']}\t{o['size']}\t{o['etag']}\t{o.get('versionId') or ''}"
        for o in objects.values()
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:40]


def _md5(path: Path) -> str:
    return hash_file(path, hashlib.md5(usedforsecurity=False)).hexdigest()


def _sha256_b64(path: Path) -> str:
    return base64.b64encode(hash_file(path, hashlib.sha256()).digest()).decode()


def _verify(path: Path, name: str, obj: dict[str, Any], uri: str) -> None:
    """A single-part ETag is the object's MD5 (not a multipart one, `<hash>-<parts>`, nor one
    encrypted with KMS or a customer key); a full-object SHA-256 when the store kept one."""
    checks: list[tuple[str, str, str]] = []
    if obj.get("sha256"):
        checks.append(("sha256", _sha256_b64(path), obj["sha256"]))
    etag = obj["etag"]
    md5_like = len(etag) == 32 and all(c in "0123456789abcdef" for c in etag)
    if md5_like and not obj.get("encrypted"):
        checks.append(("md5 (ETag)", _md5(path), etag))
    for kind, got, want in checks:
        if got != want:
            path.unlink(missing_ok=True)
            raise SourceError(
                "ChecksumMismatch",
                f"{uri}: {name}: {kind} {got} is not the store's {want} (removed; run again)",
            )


def _get(client: Any, bucket: str, obj: dict[str, Any], target: Path) -> None:
    """Download one object into target, continuing a partial file from where it stopped; the
    ETag must still match (If-Match), so a resumed file never mixes two versions."""
    partial = target.with_name(target.name + PARTIAL)
    have = partial.stat().st_size if partial.exists() else 0
    if have > obj["size"]:
        partial.unlink()
        have = 0
    if have < obj["size"]:
        kwargs: dict[str, Any] = {
            "Bucket": bucket,
            "Key": obj["key"],
            "IfMatch": f'"{obj["etag"]}"',
        }
        if obj.get("versionId"):
            kwargs["VersionId"] = obj["versionId"]
        if have:
            kwargs["Range"] = f"bytes={have}-"
        body = client.get_object(**kwargs)["Body"]
        with partial.open("ab") as f:
            while chunk := body.read(CHUNK):
                f.write(chunk)
    if partial.stat().st_size != obj["size"]:
        raise SourceError(
            "Unreachable",
            f"{obj['key']}: got {partial.stat().st_size} of {obj['size']} bytes; run again",
        )
    partial.replace(target)


def fetch_s3(
    src: SourceURI, dest: Path, progress: Progress, *, revision: str | None = None
) -> Fetched:
    uri = f"s3://{src.location}/{src.path}".rstrip("/")
    try:
        client = _client()
        objects = _listing(client, src.location, src.path)
        if not objects:
            raise SourceError("NotFound", f"{uri}: no objects under this prefix")
        for o in objects.values():
            # The version id pins the object where the bucket keeps versions; the checksum, where
            # the uploader asked for one.
            head = client.head_object(Bucket=src.location, Key=o["key"], ChecksumMode="ENABLED")
            if head.get("VersionId") and head["VersionId"] != "null":
                o["versionId"] = head["VersionId"]
            if head.get("ServerSideEncryption") == "aws:kms" or head.get("SSECustomerAlgorithm"):
                o["encrypted"] = True
            sha = head.get("ChecksumSHA256")
            if sha and "-" not in sha and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
                o["sha256"] = sha
    except Exception as err:
        raise _classify(uri, err) from err
    check_weights(uri, list(objects))
    pinned = _revision(objects)
    if revision and revision != pinned:
        raise SourceError(
            "RevisionMismatch",
            f"{uri}: the objects changed since revision {revision} (now {pinned})",
        )
    files = objects
    before = read_manifest(dest)
    done = set()
    if before is not None and before.uri == uri:
        done = {
            n
            for n, e in files.items()
            if before.files.get(n) == e
            and (dest / n).is_file()
            and (dest / n).stat().st_size == e["size"]
        }
    if len(done) == len(files):
        return Fetched(uri=uri, revision=pinned, files=files)
    progress.start(sum(o["size"] for o in objects.values()), len(objects), pinned)
    fetched = 0
    try:
        for name, obj in sorted(objects.items()):
            if name in done:
                continue
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            _get(client, src.location, obj, target)
            _verify(target, name, obj, uri)
            fetched += obj["size"]
    except Exception as err:
        raise _classify(uri, err) from err
    finally:
        progress.stop()
    return Fetched(uri=uri, revision=pinned, files=files, downloaded_bytes=fetched)
