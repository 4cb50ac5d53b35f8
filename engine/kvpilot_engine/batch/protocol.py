"""OpenAI's batch file format: one request per input line, one result per output line.

An input line is `{"custom_id", "method": "POST", "url", "body"}`; an output line is
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}` as OpenAI's
Batch API and vLLM's `run-batch` write it. A request the server would refuse (a body that fails
validation, another model) becomes a line whose response carries that 4xx and the OpenAI-shaped
error body, exactly what the endpoint would have answered; a line that is not a request at all
(not JSON, no custom_id, an unknown url) gets `error` instead and no response.

Torch-free: the router's Batch API validates uploads with the same code.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

# The endpoints a batch line may name (OpenAI's Batch API also has embeddings; we do not serve it).
ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
Endpoint = Literal["/v1/chat/completions", "/v1/completions"]


class BatchRequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    custom_id: str
    method: Literal["POST"]
    url: Endpoint
    body: dict[str, Any]


class BatchError(BaseModel):
    code: str
    message: str


class BatchResponseData(BaseModel):
    status_code: int = 200
    request_id: str
    body: dict[str, Any] | None = None


class BatchRequestOutput(BaseModel):
    id: str
    custom_id: str | None
    response: BatchResponseData | None
    error: BatchError | None = None


@dataclass
class Line:
    """One input line, read: a request, or the reason it is not one."""

    number: int  # 1-based, for messages
    request: BatchRequestInput | None = None
    error: BatchError | None = None
    custom_id: str | None = None  # when it could be read even though the line is bad


def parse_line(number: int, text: str | bytes) -> Line:
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return Line(number, error=BatchError(code="invalid_json", message=f"line {number}: {e}"))
    custom_id = raw.get("custom_id") if isinstance(raw, dict) else None
    custom_id = custom_id if isinstance(custom_id, str) else None
    try:
        return Line(number, request=BatchRequestInput.model_validate(raw), custom_id=custom_id)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        where = ".".join(str(x) for x in err.get("loc", ()))
        msg = f"line {number}: {where}: {err['msg']}" if where else f"line {number}: {err['msg']}"
        code = "invalid_url" if where == "url" else "invalid_request"
        return Line(number, error=BatchError(code=code, message=msg), custom_id=custom_id)


def read_lines(data: bytes) -> list[Line]:
    """Every non-blank line of a batch file, with duplicate custom_ids refused after the first
    (results are keyed by custom_id, so a second one could never be told apart)."""
    seen: set[str] = set()
    lines = []
    for i, text in enumerate(data.split(b"\n"), start=1):
        if not text.strip():
            continue
        line = parse_line(i, text)
        if line.request is not None:
            cid = line.request.custom_id
            if cid in seen:
                line = Line(
                    i,
                    error=BatchError(
                        code="duplicate_custom_id",
                        message=f"line {i}: custom_id {cid!r} appears on an earlier line",
                    ),
                    custom_id=cid,
                )
            seen.add(cid)
        lines.append(line)
    return lines


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def success(custom_id: str, body: BaseModel | dict[str, Any], status: int = 200) -> str:
    """An output line (JSON, no newline) for an answered request, any status."""
    payload = body.model_dump(mode="json") if isinstance(body, BaseModel) else body
    return BatchRequestOutput(
        id=new_id("batch_req"),
        custom_id=custom_id,
        response=BatchResponseData(
            status_code=status, request_id=new_id("batch-request"), body=payload
        ),
    ).model_dump_json()


def api_error(
    custom_id: str, status: int, message: str, param: str | None, code: str | int | None
) -> str:
    """An output line for a request the endpoint refused: its status and error body."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return success(custom_id, body, status)


def line_error(line: Line) -> str:
    """An output line for an input line that is no request."""
    assert line.error is not None
    return BatchRequestOutput(
        id=new_id("batch_req"), custom_id=line.custom_id, response=None, error=line.error
    ).model_dump_json()


def finished_ids(data: bytes) -> tuple[set[str], int]:
    """custom_ids already in an output file, and the length of its whole lines: a run killed
    mid-write leaves a partial last line, which a resumed run cuts off and redoes."""
    end = data.rfind(b"\n") + 1
    done: set[str] = set()
    for text in data[:end].split(b"\n"):
        if not text.strip():
            continue
        try:
            cid = json.loads(text).get("custom_id")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(cid, str):
            done.add(cid)
    return done, end


@dataclass
class ResultCheck:
    """A batch's output lines held against the custom_ids it was given: what a benchmark checks
    before it trusts its figures (every request answered once, none failed)."""

    succeeded: int = 0  # lines with a 200 response
    failed: int = 0  # lines with an error, or a response with another status
    completion_tokens: int = 0  # the usage of the 200 responses
    problems: list[str] = field(default_factory=list)  # empty when all is well


def check_results(data: bytes, custom_ids: Iterable[str]) -> ResultCheck:
    """Count the output lines in `data` (an output file, or a Batch API batch's output and error
    files together) and name what is wrong: ids missing, repeated or not asked for, failures."""
    check = ResultCheck()
    seen: Counter[str] = Counter()
    first_failure = None
    for text in data.split(b"\n"):
        if not text.strip():
            continue
        out = BatchRequestOutput.model_validate_json(text)
        if out.custom_id is not None:  # a line that was no request may have none: failed below
            seen[out.custom_id] += 1
        response = out.response
        if out.error is None and response is not None and response.status_code == 200:
            check.succeeded += 1
            usage = (response.body or {}).get("usage") or {}
            check.completion_tokens += usage.get("completion_tokens", 0)
            continue
        check.failed += 1
        if first_failure is None:
            why = out.error.message if out.error else json.dumps(response and response.body)
            first_failure = f"{out.custom_id}: {why[:200]}"
    wanted = set(custom_ids)

    def name(what: str, ids: list[str]) -> None:
        if ids:
            check.problems.append(f"{len(ids)} custom_ids {what} (first: {sorted(ids)[0]!r})")

    name("missing", [i for i in wanted if i not in seen])
    name("answered more than once", [i for i, n in seen.items() if n > 1])
    name("not in the input", [i for i in seen if i not in wanted])
    if first_failure is not None:
        check.problems.append(f"{check.failed} requests failed (first: {first_failure})")
    return check
