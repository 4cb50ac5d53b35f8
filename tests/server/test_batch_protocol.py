"""The batch file format on its own: which lines are requests, which are errors, and what a
resumed run finds already done in an output."""

from __future__ import annotations

import json

from kvpilot_engine.batch import protocol


def _line(custom_id: str, url: str = "/v1/completions", **extra: object) -> bytes:
    body = {"model": "m", "prompt": "hi"}
    return json.dumps(
        {"custom_id": custom_id, "method": "POST", "url": url, "body": body, **extra}
    ).encode()


def test_read_lines_sorts_requests_from_errors() -> None:
    data = b"\n".join(
        [
            _line("a"),
            b"",
            b"[1, 2",
            _line("b", url="/v1/embeddings"),
            _line("a", url="/v1/chat/completions"),
            json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}).encode(),
            _line("c", method="GET"),
            _line("d", extra_field=1),
            b"\xff\xfe",
        ]
    )
    lines = protocol.read_lines(data)
    assert [ln.number for ln in lines] == [1, 3, 4, 5, 6, 7, 8, 9]  # blank lines skipped
    assert lines[0].request is not None and lines[0].request.custom_id == "a"
    codes = [(ln.custom_id, ln.error.code) for ln in lines[1:] if ln.error]
    assert codes == [
        (None, "invalid_json"),
        ("b", "invalid_url"),
        ("a", "duplicate_custom_id"),
        (None, "invalid_request"),  # no custom_id
        ("c", "invalid_request"),
        ("d", "invalid_request"),
        (None, "invalid_json"),
    ]
    assert "line 6: custom_id" in lines[4].error.message


def test_output_lines_and_resume() -> None:
    ok = json.loads(protocol.success("a", {"choices": []}))
    assert ok["custom_id"] == "a" and ok["error"] is None
    assert ok["response"]["status_code"] == 200 and ok["response"]["body"] == {"choices": []}
    refused = json.loads(protocol.api_error("b", 404, "no such model", "model", "model_not_found"))
    assert refused["response"]["status_code"] == 404
    assert refused["response"]["body"]["error"] == {
        "message": "no such model",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    bad = protocol.read_lines(b"nope")[0]
    assert json.loads(protocol.line_error(bad))["error"]["code"] == "invalid_json"

    whole = protocol.success("a", {}) + "\n" + protocol.api_error("b", 400, "x", None, None)
    data = (whole + "\n" + protocol.success("c", {})[:40]).encode()
    done, end = protocol.finished_ids(data)
    assert done == {"a", "b"} and end == len(whole) + 1  # the torn line is not done
    assert protocol.finished_ids(b"") == (set(), 0)


def test_check_results_names_missing_repeated_unasked_and_failed_ids() -> None:
    def answered(cid: str, tokens: int) -> str:
        return protocol.success(cid, {"usage": {"completion_tokens": tokens}})

    good = "\n".join([answered("a", 3), answered("b", 4)]) + "\n"
    check = protocol.check_results(good.encode(), ["a", "b"])
    assert (check.succeeded, check.failed, check.completion_tokens) == (2, 0, 7)
    assert check.problems == []

    bad = [
        answered("a", 3),
        answered("a", 3),
        protocol.api_error("x", 400, "max_tokens is too large", "max_tokens", None),
        protocol.line_error(protocol.read_lines(b"nope")[0]),  # no custom_id at all
    ]
    check = protocol.check_results("\n".join(bad).encode(), ["a", "b", "x"])
    assert (check.succeeded, check.failed, check.completion_tokens) == (2, 2, 6)
    missing, repeated, failed = check.problems
    assert missing == "1 custom_ids missing (first: 'b')"
    assert repeated == "1 custom_ids answered more than once (first: 'a')"
    assert failed.startswith("2 requests failed (first: x: ") and "too large" in failed

    unasked = protocol.check_results(answered("z", 1).encode(), [])
    assert unasked.problems == ["1 custom_ids not in the input (first: 'z')"]
