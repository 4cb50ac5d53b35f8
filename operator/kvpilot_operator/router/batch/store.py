"""Files, batch records and results, kept in one directory.

A directory (in a cluster, a PersistentVolumeClaim mounted into the router) rather than an
S3-compatible store: results are appended one line per finished request, which a filesystem does
in place and an object store cannot (an object is rewritten whole, so a 50,000-line batch would
rewrite its output 50,000 times or lose what it buffered on a crash); it needs no credentials, no
extra client library in the router image and nothing else running; and a PVC outlives the pod,
which is all a restart needs.

Records are JSON files replaced atomically (written aside, fsynced, renamed), so a crash leaves
the old record or the new one. Result lines are appended and fsynced before the request counts as
done, and a record's counts are recomputed from its result files when a batch resumes, so a
request is answered in the output at most once and never lost: one whose answer was not yet on
disk when the router died is sent again.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from kvpilot_engine.batch import protocol

from kvpilot_operator.router.batch.objects import Batch, FileObject


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def new_id(prefix: str) -> str:
    """`file-…`, `batch_…`: OpenAI's shapes."""
    return prefix + uuid.uuid4().hex[:24]


class BatchStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.files_dir = self.root / "files"
        self.batches_dir = self.root / "batches"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.batches_dir.mkdir(parents=True, exist_ok=True)

    # ---- files --------------------------------------------------------------------------------
    def add_file(self, filename: str, purpose: str, data: bytes) -> FileObject:
        fid = new_id("file-")
        _atomic_write(self.files_dir / f"{fid}.jsonl", data)
        obj = FileObject(
            id=fid, bytes=len(data), created_at=int(time.time()), filename=filename, purpose=purpose
        )
        # The record last: a file is listed only once its bytes are all there.
        self._save_file(obj, f"files/{fid}.jsonl")
        return obj

    def _save_file(self, obj: FileObject, rel_path: str) -> None:
        record = {**obj.model_dump(), "path": rel_path}
        _atomic_write(self.files_dir / f"{obj.id}.json", json.dumps(record).encode())

    def get_file(self, fid: str) -> FileObject | None:
        record = self._file_record(fid)
        return None if record is None else FileObject.model_validate(record)

    def file_content(self, fid: str) -> bytes | None:
        record = self._file_record(fid)
        if record is None:
            return None
        path = self.root / record["path"]
        return path.read_bytes() if path.exists() else b""

    def _file_record(self, fid: str) -> dict | None:  # type: ignore[type-arg]
        if not _safe(fid):
            return None
        path = self.files_dir / f"{fid}.json"
        if not path.exists():
            return None
        record = json.loads(path.read_bytes())
        return record  # type: ignore[no-any-return]

    # ---- batches ------------------------------------------------------------------------------
    def save_batch(self, batch: Batch) -> None:
        _atomic_write(self.batches_dir / f"{batch.id}.json", batch.model_dump_json().encode())

    def get_batch(self, bid: str) -> Batch | None:
        if not _safe(bid):
            return None
        path = self.batches_dir / f"{bid}.json"
        return Batch.model_validate_json(path.read_bytes()) if path.exists() else None

    def batches(self) -> Iterator[Batch]:
        """Every batch, newest first."""
        found = [
            Batch.model_validate_json(p.read_bytes())
            for p in self.batches_dir.glob("*.json")
            if not p.name.startswith(".")
        ]
        yield from sorted(found, key=lambda b: (b.created_at, b.id), reverse=True)

    # ---- results ------------------------------------------------------------------------------
    def results_path(self, bid: str, kind: str) -> Path:
        return self.batches_dir / f"{bid}.{kind}.jsonl"  # kind: output | errors

    def append_result(self, bid: str, kind: str, line: str) -> None:
        with open(self.results_path(bid, kind), "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def answered(self, bid: str) -> tuple[set[str], set[str]]:
        """custom_ids with a result on disk: (succeeded, failed). A line torn by a crash is cut
        off, so that the next append starts on a line of its own."""
        out = []
        for kind in ("output", "errors"):
            path = self.results_path(bid, kind)
            if not path.exists():
                out.append(set())
                continue
            data = path.read_bytes()
            done, end = protocol.finished_ids(data)
            if end < len(data):
                with open(path, "r+b") as f:
                    f.truncate(end)
            out.append(done)
        return out[0], out[1]

    def publish_results(self, batch: Batch) -> None:
        """The result files as File objects (purpose batch_output), named on the batch."""
        now = int(time.time())
        for kind in ("output", "errors"):
            path = self.results_path(batch.id, kind)
            if not path.exists() or path.stat().st_size == 0:
                continue
            fid = f"file-{batch.id.removeprefix('batch_')}-{kind}"
            obj = FileObject(
                id=fid,
                bytes=path.stat().st_size,
                created_at=now,
                filename=f"{batch.id}_{kind}.jsonl",
                purpose="batch_output",
            )
            self._save_file(obj, f"batches/{path.name}")
            if kind == "output":
                batch.output_file_id = fid
            else:
                batch.error_file_id = fid


def _safe(name: str) -> bool:
    """An id as we make them: no path separators, no dots (a client names it in the URL)."""
    return bool(name) and len(name) <= 128 and all(c.isalnum() or c in "-_" for c in name)
